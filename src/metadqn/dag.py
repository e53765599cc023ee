"""Reading the pipeline's one DAG, ``dvc.yaml``, and what DVC recorded, ``dvc.lock``.

Nothing else in the code restates stage order, a stage's code dependencies or the lock's layout: the
pipeline flow takes its stage order from here, collect's reuse fingerprint takes its code from collect's
deps here, and the report and the pipeline read recorded hashes through :func:`lock_outs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DVC_YAML = Path("dvc.yaml")
DVC_LOCK = Path("dvc.lock")
PACKAGE = Path(__file__).resolve().parent
"""The installed metadqn package (``src/metadqn`` in a checkout)."""
CHECKOUT = PACKAGE.parents[1]
"""The checkout the package runs from, if it is one (editable install): where its dvc.yaml lives."""
CODE_ROOTS = ("src/", "flows/")


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def stages(dvc_yaml: Path = DVC_YAML) -> tuple[str, ...]:
    """The stages in dvc.yaml's order (a topological order: each stage is listed after its inputs')."""
    return tuple(_yaml(dvc_yaml)["stages"])


def code_files(stage: str, dvc_yaml: Path | None = None) -> list[Path]:
    """The source files a stage depends on: its dvc.yaml deps under src/ and flows/ (folders expanded to
    their .py files), sorted. Without a dvc.yaml beside the package (a wheel install): every .py file of
    the package, so a change of code is never missed."""
    dvc_yaml = dvc_yaml or CHECKOUT / DVC_YAML
    if not dvc_yaml.exists():
        return sorted(PACKAGE.rglob("*.py"))
    root = dvc_yaml.resolve().parent
    deps = [d for d in _yaml(dvc_yaml)["stages"][stage].get("deps", []) if d.startswith(CODE_ROOTS)]
    files = []
    for dep in deps:
        path = root / dep
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return sorted(set(files))


def lock_outs(dvc_lock: Path = DVC_LOCK) -> dict[str, dict[str, str]]:
    """What dvc.lock recorded: ``{stage: {out path: md5}}`` (empty if there is no lock yet)."""
    if not dvc_lock.exists():
        return {}
    return {name: {o["path"]: o["md5"] for o in stage.get("outs", [])}
            for name, stage in (_yaml(dvc_lock).get("stages") or {}).items()}


def recorded_md5(path: Path, dvc_lock: Path = DVC_LOCK) -> str | None:
    """The md5 dvc.lock recorded for the output ``path`` (None if it has none)."""
    for outs in lock_outs(dvc_lock).values():
        if str(path) in outs:
            return outs[str(path)]
    return None


def code_digest(stage: str, dvc_yaml: Path | None = None) -> str:
    """sha256 of a stage's source files (:func:`code_files`), each named by its path in the checkout."""
    import hashlib

    root = (dvc_yaml or CHECKOUT / DVC_YAML).resolve().parent
    h = hashlib.sha256()
    for f in code_files(stage, dvc_yaml):
        name = f.resolve().relative_to(root) if f.resolve().is_relative_to(root) else f.relative_to(PACKAGE)
        h.update(name.as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
