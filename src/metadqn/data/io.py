"""Atomic, value-checked file writes, checked reads, and DVC-compatible content hashes.

Every output goes through :func:`atomic_path`: the file is written under a temporary name in the same
folder and renamed into place only when complete, so an interrupted stage never leaves a half file
(``os.replace`` is atomic on POSIX within one filesystem). A kill -9 between the write and the rename
leaves a ``.<name>.<random>.tmp`` file; :func:`remove_stale_temps` deletes those when a stage starts, and
``.dvcignore`` keeps DVC from ever hashing one into an output.

Writers refuse non-finite numbers (:class:`CorruptDataError`): a NaN network or metric never becomes a file
that DVC records. Readers check values as well as structure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metadqn.errors import UserError

TEMP_SUFFIX = ".tmp"


class CorruptDataError(UserError, ValueError):
    """A file holds (or a writer was handed) data no stage can use: unreadable, truncated or non-finite.
    The message is one line naming the file and the fix."""


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; outputs get the mode any new file gets under the user's umask
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Deletes the temporary files an interrupted :func:`atomic_path` left in ``folder`` (recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _non_finite_key(obj: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in a JSON-like object (None if there is none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite_key(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def write_json(path: Path | str, obj: Any) -> None:
    """Writes ``obj`` as JSON; refuses NaN and infinity (they are not JSON, and never a valid result)."""
    bad = _non_finite_key(obj)
    if bad is not None:
        raise CorruptDataError(f"{path}: refusing to write a non-finite number at {bad} (a diverged or degenerate "
                               "run upstream)")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def require_finite(frame: pd.DataFrame, where: Path | str, columns: list[str] | None = None) -> pd.DataFrame:
    """Returns ``frame`` if its numeric ``columns`` (default: all numeric ones, NaN allowed nowhere) are finite."""
    cols = columns if columns is not None else [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])
                                                and not pd.api.types.is_bool_dtype(frame[c])]
    for col in cols:
        values = frame[col].to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CorruptDataError(f"{where}: column {col} holds {int(bad.sum())} non-finite value(s) (first: row {i}, "
                                   f"{values[i]}); rerun the stage that wrote it")
    return frame


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _check_weights(state_dict: dict[str, Any], where: Path | str) -> None:
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CorruptDataError(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CorruptDataError(f"{where}: tensor {k!r} holds non-finite weights (a diverged training run)")


def save_state_dict(path: Path | str, state_dict: dict[str, torch.Tensor]) -> None:
    """Saves a state_dict atomically; refuses non-finite weights."""
    _check_weights(state_dict, path)
    # Through a file handle: given a path, torch.save names the zip's root folder after the (temporary,
    # random) file name, so identical tensors gave different bytes and DVC hashes in every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, handle)


def load_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Loads a state_dict with ``weights_only=True`` (no pickled code is ever executed) and checks that it is
    a mapping of finite tensors; a truncated or foreign file is a :class:`CorruptDataError`."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... for a damaged file
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise CorruptDataError(f"{path}: not a readable state_dict ({type(exc).__name__}: {first}); delete it and "
                               "rerun the stage that wrote it (or `dvc checkout`)") from None
    if not isinstance(sd, dict):
        raise CorruptDataError(f"{path}: holds a {type(sd).__name__}, not a state_dict")
    _check_weights(sd, path)
    return sd


def file_md5(path: Path | str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_md5(path: Path | str) -> str:
    """The md5 DVC 3 records for ``path`` in dvc.lock: a file's md5, or a directory's ``<md5>.dir``.

    Lets a stage name its output's DVC hash (e.g. as the MLflow dataset digest) before DVC commits it.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    entries = sorted(
        ({"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()} for p in path.rglob("*") if p.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"
