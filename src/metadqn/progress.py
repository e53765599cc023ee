"""Progress for long loops: a rich progress bar on a terminal, plain log lines otherwise (CI, DVC logs)."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

log = logging.getLogger("metadqn")


class Progress:
    """``with Progress(total, "training experts") as p: p.advance(n)``."""

    def __init__(self, total: int, description: str, log_every: float = 0.1):
        self.total, self.description, self.log_every = max(int(total), 1), description, log_every
        self.done = 0
        self._next_log = log_every
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._start = time.perf_counter()

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        else:
            log.info("%s: started (%d steps)", self.description, self.total)
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            assert self._task is not None  # set together with _bar
            self._bar.update(self._task, advance=n)
        elif self.done / self.total >= self._next_log:
            log.info("%s: %d%% (%.0f s)", self.description, 100 * self.done // self.total,
                     time.perf_counter() - self._start)
            while self._next_log <= self.done / self.total:
                self._next_log += self.log_every

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc is None:
            log.info("%s: done in %.1f s", self.description, time.perf_counter() - self._start)
