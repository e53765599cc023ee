"""The trajectory dataset: one Parquet file per task under ``data/trajectories/``.

Schema (one row per transition), checked on every read:

=================  ========  =========================================================================
column             type      meaning
=================  ========  =========================================================================
task_id            string    the task (row of ``data/tasks.parquet``)
episode            int64     episode index within the task and source
step               int64     index of ``obs`` within its episode (0 = the reset observation)
obs_0 .. obs_{n-1} float32   observation before the action
action             int64     action taken
reward             float32   reward received
next_obs_0 ..      float32   observation after the action (the true final observation at episode ends)
terminated         bool      the episode ended in a terminal state (no bootstrapping)
truncated          bool      the episode hit the time limit (bootstrapping still valid)
source             string    exploration (uniform-random policy: task contexts), expert (the expert's
                             epsilon-greedy rollouts), replay (the last transitions of the expert's
                             DQN replay buffer)
=================  ========  =========================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from metadqn.data.io import CorruptDataError, atomic_path, require_finite
from metadqn.errors import UserError

SOURCES = ("exploration", "expert", "replay")


class SchemaError(UserError, ValueError):
    """A trajectory file does not match the documented schema (one-line message)."""


def schema(obs_dim: int) -> pa.Schema:
    obs = [pa.field(f"obs_{i}", pa.float32()) for i in range(obs_dim)]
    nxt = [pa.field(f"next_obs_{i}", pa.float32()) for i in range(obs_dim)]
    return pa.schema([
        pa.field("task_id", pa.string()), pa.field("episode", pa.int64()), pa.field("step", pa.int64()),
        *obs, pa.field("action", pa.int64()), pa.field("reward", pa.float32()), *nxt,
        pa.field("terminated", pa.bool_()), pa.field("truncated", pa.bool_()), pa.field("source", pa.string()),
    ])


def to_frame(task_id: str, source: str, transitions: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Rows for one task and source from arrays obs [N, d], action, reward, next_obs, terminated, ..."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES} (got {source!r})")
    obs, nxt = np.asarray(transitions["obs"]), np.asarray(transitions["next_obs"])
    n, d = obs.shape
    cols: dict[str, object] = {"task_id": [task_id] * n, "episode": transitions["episode"], "step": transitions["step"]}
    cols.update({f"obs_{i}": obs[:, i] for i in range(d)})
    cols["action"] = transitions["action"]
    cols["reward"] = transitions["reward"]
    cols.update({f"next_obs_{i}": nxt[:, i] for i in range(d)})
    cols["terminated"] = transitions["terminated"]
    cols["truncated"] = transitions["truncated"]
    cols["source"] = [source] * n
    return cast_frame(pd.DataFrame(cols), d)


def cast_frame(frame: pd.DataFrame, obs_dim: int) -> pd.DataFrame:
    sch = schema(obs_dim)
    return pa.Table.from_pandas(frame, schema=sch, preserve_index=False).to_pandas()


def _value_columns(obs_dim: int) -> list[str]:
    return [*(f"obs_{i}" for i in range(obs_dim)), "reward", *(f"next_obs_{i}" for i in range(obs_dim))]


def write_task(path: Path, frame: pd.DataFrame, obs_dim: int) -> None:
    """Writes one task's transitions atomically (refused if an observation or reward is not finite)."""
    require_finite(frame, path, _value_columns(obs_dim))
    table = pa.Table.from_pandas(frame, schema=schema(obs_dim), preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def check_table(table: pa.Table, obs_dim: int, where: str) -> None:
    expected = schema(obs_dim)
    missing = [f.name for f in expected if f.name not in table.schema.names]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {', '.join(missing)}; see metadqn.data.trajectories")
    for f in expected:
        got = table.schema.field(f.name).type
        if got != f.type:
            raise SchemaError(f"{where}: column {f.name} has type {got}, expected {f.type}")
    extra = [n for n in table.schema.names if n not in expected.names]
    if extra:
        raise SchemaError(f"{where}: unexpected column(s) {', '.join(extra)}")
    bad = set(table.column("source").unique().to_pylist()) - set(SOURCES)
    if bad:
        raise SchemaError(f"{where}: unknown source value(s) {sorted(bad)}; expected one of {SOURCES}")


def read_task(path: Path, obs_dim: int) -> pd.DataFrame:
    """Reads and checks one task's file: the schema, then the values (finite observations and rewards)."""
    if not path.exists():
        raise SchemaError(f"{path}: not found (run `metadqn collect` or `dvc pull`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptDataError(f"{path}: not a readable Parquet file ({type(exc).__name__}); delete it and rerun "
                               "`dvc repro collect` (or `dvc checkout`)") from None
    check_table(table, obs_dim, str(path))
    return require_finite(table.to_pandas(), path, _value_columns(obs_dim))


def read_tasks(root: Path, task_ids: Iterable[str], obs_dim: int, sources: Iterable[str] = SOURCES) -> pd.DataFrame:
    """Reads several tasks' transitions (filtered to ``sources``) into one frame."""
    wanted = set(sources)
    frames = [read_task(root / f"{tid}.parquet", obs_dim) for tid in task_ids]
    if not frames:
        return cast_frame(pd.DataFrame({f.name: [] for f in schema(obs_dim)}), obs_dim)
    out = pd.concat(frames, ignore_index=True)
    return out[out["source"].isin(wanted)].reset_index(drop=True)
