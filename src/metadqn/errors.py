"""The one kind of error a user sees: a mistake in their inputs or environment, said in one line.

Every such error class derives from :class:`UserError` (e.g. ``ParamsError``, ``CorruptDataError``). The CLI
prints one as ``error: <message>`` (exit 2). Inside a stage it is raised from within a Prefect flow, whose
engine would log it with a full traceback first; :func:`quiet_user_errors` drops those log records, so the
one line is all the user gets. Anything else is a bug and keeps its traceback in the logs.
"""

from __future__ import annotations

import errno
import logging


class UserError(Exception):
    """A mistake in the user's inputs or environment; its message is one line naming what and how to fix it."""


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for want of space (disk full, quota, file-size limit): the user's to fix, in one line."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _DropUserErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and (isinstance(exc, UserError) or is_disk_full(exc)))


_FILTER = _DropUserErrors()
_PREFECT_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
"""The loggers Prefect's flow and task engines report a run's exception on."""


def quiet_user_errors() -> None:
    """Stops Prefect from logging a :class:`UserError` with its traceback (idempotent; per process)."""
    for name in _PREFECT_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
