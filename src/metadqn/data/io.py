"""Atomic file writes and DVC-compatible content hashes.

Every output goes through :func:`atomic_path`: the file is written under a temporary name in the same
folder and renamed into place only when complete, so an interrupted stage never leaves a half file
(``os.replace`` is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_state_dict(path: Path | str, state_dict: dict[str, torch.Tensor]) -> None:
    # Through a file handle: given a path, torch.save names the zip's root folder after the (temporary,
    # random) file name, so identical tensors gave different bytes and DVC hashes in every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, handle)


def load_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Loads a state_dict with ``weights_only=True`` (no pickled code is ever executed)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


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
