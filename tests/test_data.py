from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metadqn.data import trajectories as traj
from metadqn.data.io import atomic_path, dvc_md5, load_state_dict, save_state_dict, write_json
from metadqn.dqn import init_state_dict


def _transitions(n: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.normal(size=(n, d)).astype(np.float32), "next_obs": rng.normal(size=(n, d)).astype(np.float32),
        "action": rng.integers(0, 2, n), "reward": np.ones(n, dtype=np.float32),
        "terminated": rng.random(n) < 0.1, "truncated": np.zeros(n, dtype=bool),
        "episode": np.arange(n) // 10, "step": np.arange(n) % 10,
    }


def test_trajectory_schema_round_trip(tmp_path):
    frame = traj.to_frame("train-000", "expert", _transitions(25, 4))
    path = tmp_path / "train-000.parquet"
    traj.write_task(path, frame, obs_dim=4)
    back = traj.read_task(path, obs_dim=4)
    assert back.equals(frame)
    assert list(back.columns) == traj.schema(4).names
    np.testing.assert_array_equal(back[[f"obs_{i}" for i in range(4)]].to_numpy(), _transitions(25, 4)["obs"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop_columns(["reward"]), "missing column(s) reward"),
        (lambda t: t.set_column(t.schema.get_field_index("action"), "action",
                                t.column("action").cast(pa.float64())), "column action has type double"),
        (lambda t: t.append_column("extra", pa.array([1] * t.num_rows)), "unexpected column(s) extra"),
        (lambda t: t.set_column(t.schema.get_field_index("source"), "source",
                                pa.array(["bogus"] * t.num_rows)), "unknown source value(s)"),
    ],
)
def test_schema_is_checked_on_read(tmp_path, mutate, message):
    frame = traj.to_frame("t", "replay", _transitions(5, 2))
    table = pa.Table.from_pandas(frame, schema=traj.schema(2), preserve_index=False)
    path = tmp_path / "t.parquet"
    pq.write_table(mutate(table), path)
    with pytest.raises(traj.SchemaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        traj.read_task(path, obs_dim=2)


def test_interrupted_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{")
    assert '"a": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    fresh = tmp_path / "new.parquet"
    with pytest.raises(RuntimeError), atomic_path(fresh) as tmp:
        tmp.write_bytes(b"PAR1")
        raise RuntimeError("killed")
    assert not fresh.exists()


def test_state_dict_io_is_weights_only(tmp_path):
    sd = init_state_dict(4, 2, [8], seed=0)
    save_state_dict(tmp_path / "q.pt", sd)
    back = load_state_dict(tmp_path / "q.pt")
    assert back.keys() == sd.keys()
    assert all(np.array_equal(back[k].numpy(), sd[k].numpy()) for k in sd)


def test_dvc_md5_matches_dvc_conventions(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "a.txt").write_text("a")
    h = dvc_md5(tmp_path / "d")
    assert h.endswith(".dir") and len(h) == 36
    assert dvc_md5(tmp_path / "d" / "a.txt") == "0cc175b9c0f1b6a831c399e269772661"  # md5("a")


def test_saving_the_same_state_dict_twice_gives_the_same_bytes(tmp_path):
    sd = init_state_dict(4, 2, [8], seed=0)
    save_state_dict(tmp_path / "a.pt", sd)
    save_state_dict(tmp_path / "b.pt", sd)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
