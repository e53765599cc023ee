from __future__ import annotations

import fractions
import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from metadqn.data import trajectories as traj
from metadqn.data.io import CorruptDataError, atomic_path, dvc_md5, load_state_dict, save_state_dict, write_json
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


class _MkdirOnUnpickle:
    """Unpickling this calls ``os.mkdir(marker)``: code a malicious checkpoint would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("payload", ["reduce", "instance"])
def test_load_state_dict_refuses_pickled_objects_and_runs_no_code(tmp_path, payload):
    marker = tmp_path / "payload-ran"
    evil = _MkdirOnUnpickle(str(marker)) if payload == "reduce" else fractions.Fraction(1, 3)
    path = tmp_path / "evil.pt"
    torch.save({"layers.0.weight": torch.zeros(2, 2), "extra": evil}, path)
    assert not marker.exists()
    with pytest.raises(CorruptDataError, match=r"not a readable state_dict \(UnpicklingError: [Ww]eights only load"):
        load_state_dict(path)
    assert not marker.exists(), "load_state_dict executed the pickled payload"
    # control: the same file is live under an unrestricted unpickler, so the refusal above is what saved us
    loaded = torch.load(path, weights_only=False)
    assert marker.exists() if payload == "reduce" else loaded["extra"] == fractions.Fraction(1, 3)


MD5_A, MD5_B = "0cc175b9c0f1b6a831c399e269772661", "92eb5ffee6ae2fec3ad71c777531578f"  # md5(b"a"), md5(b"b")


def test_dvc_md5_matches_dvc_conventions(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "a.txt").write_text("a")
    assert dvc_md5(tmp_path / "d" / "a.txt") == MD5_A
    # DVC 3's .dir hash: md5 of json.dumps(entries sorted by relpath, sort_keys=True), i.e. with the default
    # ", " and ": " separators, plus ".dir" (dvc_data.hashfile.tree.Tree.as_bytes / digest), written out by hand
    listing = (f'[{{"md5": "{MD5_A}", "relpath": "a.txt"}}, '
               f'{{"md5": "{MD5_B}", "relpath": "b.txt"}}]').encode()
    assert dvc_md5(tmp_path / "d") == hashlib.md5(listing).hexdigest() + ".dir"


def _dvc_own_md5(path) -> str:
    """The hash DVC itself computes for ``path`` (dvc_data's build, as `dvc add`/`dvc commit` use; dry run)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem

    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(path.parent / "dvc-cache")), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def test_dvc_md5_equals_dvcs_own_hash_on_a_nested_directory(tmp_path):
    d = tmp_path / "out"
    # "a-b/c" < "a.txt" < "a/x" as strings (DVC's order), not as path components
    files = {"a.txt": b"a", "a-b/c": b"x", "a/x": b"y", "sub/b.txt": b"b\r\n",
             "sub/deeper/z.bin": bytes(range(256)) * 40, ".hidden/.x": b"h", "empty.bin": b"",
             "\u00e9 \u00fc.txt": "\u00fc".encode()}
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    (d / "empty-dir").mkdir()  # DVC tracks files only
    expected = _dvc_own_md5(d)
    assert expected.endswith(".dir")
    assert dvc_md5(d) == expected
    assert dvc_md5(d / "sub" / "deeper" / "z.bin") == _dvc_own_md5(d / "sub" / "deeper" / "z.bin")
    # and the hash follows the content: one changed byte changes it, as it changes DVC's
    (d / "sub" / "b.txt").write_bytes(b"B\r\n")
    assert dvc_md5(d) == _dvc_own_md5(d) != expected


def test_saving_the_same_state_dict_twice_gives_the_same_bytes(tmp_path):
    sd = init_state_dict(4, 2, [8], seed=0)
    save_state_dict(tmp_path / "a.pt", sd)
    save_state_dict(tmp_path / "b.pt", sd)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
