"""The training task pool refuses every file it cannot trust, with a one-line message naming the file and the fix."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from metadqn.data.pool import (
    PoolError,
    check_initial,
    ensure_pool,
    grow,
    initial_pool,
    parse_time,
    read_pool,
    write_pool,
)
from metadqn.envs import get_family
from metadqn.envs.sampling import sample_tasks

FAMILY = get_family("cartpole")
WHEN = datetime(2026, 11, 27, 3, tzinfo=UTC)


@pytest.fixture
def pool_file(tmp_path):
    path = tmp_path / "task_pool.csv"
    write_pool(path, initial_pool(FAMILY, 3, 0))
    return path


def _rewrite(path, edit) -> None:
    frame = pd.read_csv(path, dtype=str)
    edit(frame)
    frame.to_csv(path, index=False)


def test_a_valid_pool_reads_back_exactly(pool_file):
    back = read_pool(pool_file, FAMILY)
    pd.testing.assert_frame_equal(back, initial_pool(FAMILY, 3, 0))
    check_initial(back, FAMILY, 3, 0, pool_file)  # no refusal


def _set(col, value, row=None):
    def edit(frame):
        if row is None:
            frame[col] = value
        else:
            frame.loc[row, col] = value
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (lambda f: f.drop(columns=["length"], inplace=True), "missing column(s) length for family cartpole"),
    (lambda f: f.drop(index=f.index, inplace=True), "holds no tasks"),
    (_set("family", "acrobot"), "holds tasks of ['acrobot'], not of cartpole"),
    (_set("family", "acrobot", row=1), "holds tasks of ['acrobot', 'cartpole'], not of cartpole"),
    (_set("task_id", "train-000", row=2), "task ids must be unique train-<n> ids of split train"),
    (_set("task_id", "val-007", row=1), "task ids must be unique train-<n> ids of split train"),
    (_set("split", "interp", row=0), "task ids must be unique train-<n> ids of split train"),
    (_set("masspole", "heavy", row=0), "physics parameters and seeds must be numbers"),
    (_set("seed", "x", row=0), "physics parameters and seeds must be numbers"),
    (_set("force_mag", "inf", row=2), "physics parameters must be finite numbers"),
    (_set("length", "nan", row=0), "physics parameters must be finite numbers"),
], ids=["missing-column", "empty", "other-family", "mixed-families", "duplicate-id", "non-train-id",
        "non-train-split", "non-numeric-param", "non-numeric-seed", "infinite-param", "nan-param"])
def test_read_pool_refuses_a_bad_file(pool_file, edit, message):
    _rewrite(pool_file, edit)
    with pytest.raises(PoolError) as info:
        read_pool(pool_file, FAMILY)
    text = str(info.value)
    assert text.startswith(f"{pool_file}: ") and message in text and "\n" not in text


def test_read_pool_refuses_what_is_not_a_pool_csv(tmp_path):
    path = tmp_path / "task_pool.csv"
    path.write_bytes(b"\xff\xfe\x00garbage\x00")
    with pytest.raises(PoolError, match="not a task pool CSV"):
        read_pool(path, FAMILY)
    path.write_bytes(b"")
    with pytest.raises(PoolError, match="not a task pool CSV"):
        read_pool(path, FAMILY)


def test_a_missing_pool_names_the_right_fix(tmp_path):
    path = tmp_path / "task_pool.csv"
    with pytest.raises(PoolError, match="not found; run `metadqn init-pool`"):
        read_pool(path, FAMILY)
    path.with_name("task_pool.csv.dvc").write_text("outs:\n- md5: 0\n  path: task_pool.csv\n")
    with pytest.raises(PoolError, match=r"not found; run `dvc pull .*task_pool\.csv\.dvc`"):
        read_pool(path, FAMILY)


def test_a_pool_of_another_family_is_refused_even_with_its_columns(tmp_path):
    acro = get_family("acrobot")
    path = tmp_path / "task_pool.csv"
    write_pool(path, initial_pool(acro, 3, 0))
    assert len(read_pool(path, acro)) == 3
    with pytest.raises(PoolError, match="missing column"):
        read_pool(path, FAMILY)
    mirrored = get_family("cartpole-mirrored")  # a superset of cartpole's columns: refused by its family column
    write_pool(path, initial_pool(mirrored, 3, 0))
    with pytest.raises(PoolError, match=r"holds tasks of \['cartpole-mirrored'\], not of cartpole"):
        read_pool(path, FAMILY)


def test_check_initial_refuses_a_pool_params_do_not_describe(pool_file):
    pool = read_pool(pool_file, FAMILY)
    for n, seed in ((4, 0), (3, 1), (2, 0)):
        with pytest.raises(PoolError, match=f"collect.n_train_tasks={n} drawn with collect.task_seed={seed}"):
            check_initial(pool, FAMILY, n, seed, pool_file)
    nudged = pool.copy()
    nudged.loc[0, "length"] = np.nextafter(nudged.loc[0, "length"], 1.0)  # one ulp off
    with pytest.raises(PoolError, match="initial tasks are not"):
        check_initial(nudged, FAMILY, 3, 0, pool_file)


def test_ensure_pool_refuses_to_recreate_a_pool_dvc_tracks_differently(tmp_path):
    path = tmp_path / "task_pool.csv"
    dvc_file = path.with_name("task_pool.csv.dvc")
    dvc_file.write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef\n  path: task_pool.csv\n")
    with pytest.raises(PoolError, match=r"tracks a pool that params cannot recreate .* run `dvc pull"):
        ensure_pool(path, FAMILY, 3, 0)
    assert not path.exists()
    # the md5 DVC would record for the pool params make: recreated
    csv = initial_pool(FAMILY, 3, 0).to_csv(index=False).encode()
    dvc_file.write_text(f"outs:\n- md5: {hashlib.md5(csv).hexdigest()}\n  path: task_pool.csv\n")
    assert ensure_pool(path, FAMILY, 3, 0) == "created"
    assert path.read_bytes() == csv
    assert ensure_pool(path, FAMILY, 3, 0) == "present"


def test_ensure_pool_refuses_a_present_but_broken_pool_unless_forced(pool_file):
    _rewrite(pool_file, _set("task_id", "train-000", row=1))
    with pytest.raises(PoolError, match="unique"):
        ensure_pool(pool_file, FAMILY, 3, 0)
    assert ensure_pool(pool_file, FAMILY, 3, 0, force=True) == "rebuilt"
    assert len(read_pool(pool_file, FAMILY)) == 3


def test_growth_never_repeats_a_held_out_task_and_is_once_per_time(pool_file):
    pool = read_pool(pool_file, FAMILY)
    held_out = sample_tasks(FAMILY, {"val": 2, "interp": 2}, 0)
    grown = grow(pool, FAMILY, 2, WHEN, held_out)
    assert list(grown["task_id"]) == ["train-000", "train-001", "train-002", "train-003", "train-004"]
    assert grow(grown, FAMILY, 2, WHEN, held_out).equals(grown)  # the same scheduled time again: unchanged
    # a held-out task with the parameter vector growth would draw: refused
    clash = grown.iloc[3:4].assign(task_id="val-009", split="val")
    with pytest.raises(ValueError, match=r"tasks share a parameter vector: \['train-003', 'val-009'\]"):
        grow(pool, FAMILY, 2, WHEN, pd.concat([held_out, clash], ignore_index=True))


@pytest.mark.parametrize("text", ["tomorrow", "2026-13-01T00:00:00Z", "27/11/2026"])
def test_parse_time_refuses_what_is_not_iso_8601(text):
    with pytest.raises(ValueError, match="is not an ISO 8601 time"):
        parse_time(text)
