"""Recording a pipeline run as a version: DVC add/push and a git commit of the files that pin it.

After a scheduled run, ``record`` pushes the DVC-tracked data and models to the default remote and
commits ``dvc.lock``, the pool's ``.dvc`` file and the git-tracked reports on the configured branch, so
that the commit can later be checked out and reproduced with ``dvc pull`` + ``dvc repro``. Data is pushed
before the commit is made, so no commit ever points at data the remote lacks.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from metadqn.errors import UserError


class VersioningError(UserError, RuntimeError):
    """git or DVC refused; the message is one line, ready to print."""


def tool(name: str) -> str:
    # DVC runs from the project's venv (stage commands must find its metadqn), so prefer the one beside us.
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def run(name: str, *args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run([tool(name), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise VersioningError(f"`{name} {' '.join(args)}` failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def dvc_root(path: Path) -> Path | None:
    """The DVC project that contains ``path``, if any."""
    for folder in Path(path).resolve().parents:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_add(path: Path) -> None:
    """Tracks ``path`` with DVC (writes ``<path>.dvc``, caches the file) when it lies in a DVC project."""
    root = dvc_root(path)
    if root is not None:
        run("dvc", "add", str(Path(path).resolve().relative_to(root)), cwd=root)


def current_branch() -> str:
    return run("git", "rev-parse", "--abbrev-ref", "HEAD").strip()


def check_branch(branch: str) -> None:
    """Refuses (before any work) to record a run on a checkout that is not on ``branch``."""
    try:
        got = current_branch()
    except VersioningError as exc:
        raise VersioningError(f"cannot record the run: not a git checkout ({exc})") from None
    if got != branch:
        raise VersioningError(f"schedule.branch is {branch!r} but the checkout is on {got!r}: run scheduled, "
                              f"recorded runs in a dedicated clone (`git switch -c {branch}` there), or set "
                              "schedule.record: false")


def record(paths: Sequence[Path], message: str, push: bool) -> str | None:
    """``dvc push`` (if ``push``), then commits ``paths`` (what changed of them); returns the commit or None."""
    if push:
        run("dvc", "push", "-q")
    existing = [str(p) for p in paths if p.exists()]
    run("git", "add", "-A", "--", *existing)
    if not run("git", "diff", "--cached", "--name-only", "--", *existing).strip():
        return None
    try:
        run("git", "config", "user.email")
        ident: list[str] = []
    except VersioningError:  # a service account without a git identity still records its runs
        ident = ["-c", "user.name=metadqn", "-c", "user.email=metadqn@localhost"]
    run("git", *ident, "commit", "-q", "-m", message, "--", *existing)
    return run("git", "rev-parse", "HEAD").strip()
