from __future__ import annotations

import subprocess
import sys
import time

import pytest
from flows.pipeline import PipelineBusy, pipeline_lock


def test_a_second_pipeline_run_is_refused_while_one_holds_the_lock(tmp_path):
    lock = tmp_path / "p.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from flows.pipeline import pipeline_lock; from pathlib import Path\n"
        f"with pipeline_lock(Path({str(lock)!r})):\n    print('held', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineBusy, match="another metadqn pipeline run holds"), pipeline_lock(lock):
            pass
    finally:
        holder.kill()
        holder.wait()
    with pipeline_lock(lock):  # released when its holder died
        pass


def _alive(pid: int) -> bool:
    from metadqn.procs import pid_alive

    return pid_alive(pid)


def test_the_lock_is_held_until_the_guard_has_killed_the_children_of_a_killed_holder(tmp_path):
    """SIGKILL of the holder: its guard kills the child's process group (SIGTERM, SIGKILL after the grace) and
    only then lets the lock go."""
    lock = tmp_path / "p.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; from pathlib import Path\n"
        "from flows.pipeline import pipeline_lock; from metadqn.procs import Guard\n"
        f"with pipeline_lock(Path({str(lock)!r})) as fd:\n"
        "    guard = Guard(keep_fds=(fd,), grace=1.5)\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'], "
        "stdout=subprocess.PIPE, start_new_session=True)\n"
        # the child's pid is handed over only once it ignores SIGTERM: on a busy machine its interpreter may
        # still be starting when the guard's SIGTERM comes, and that kills it at once (CI saw it die in 0.09 s)
        "    child.stdout.readline()\n"
        "    guard.watch_group(child.pid)\n"
        "    print(child.pid, flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        child = int(holder.stdout.readline())
    finally:
        # the clock starts before the kill: the guard's grace starts at the holder's death, and on a busy
        # machine this process may be scheduled again long after it (a clock started later saw 0.1 s)
        start = time.monotonic()
        holder.kill()
        holder.wait()
    assert _alive(child)  # it ignores SIGTERM: the guard must wait the grace out, then SIGKILL it
    with pytest.raises(PipelineBusy), pipeline_lock(lock):
        pass
    while _alive(child):
        assert time.monotonic() - start < 10, "the guard did not kill the child"
        time.sleep(0.05)
    assert time.monotonic() - start >= 1.0  # the grace
    while True:  # the guard exits (dropping the lock) once the child is gone
        try:
            with pipeline_lock(lock):
                break
        except PipelineBusy:
            assert time.monotonic() - start < 15, "the lock was never released"
            time.sleep(0.05)


def test_run_logged_tees_to_a_log_names_the_error_and_kills_what_the_child_left(tmp_path, capfd):
    from metadqn.procs import run_logged

    script = ("sleep 60 & echo $! > stray.pid; echo progress; echo 'INFO: working' >&2; "
              "echo 'error: data/x.parquet: not found' >&2; echo 'ERROR: failed to reproduce' \"'s'\" >&2; exit 3")
    done = run_logged(["sh", "-c", script], tmp_path / "logs" / "s.log", cwd=tmp_path, grace=1.0)
    assert done.returncode == 3
    assert done.error_line == "error: data/x.parquet: not found"
    text = done.log.read_text()
    assert "progress" in text and "error: data/x.parquet: not found" in text and text.endswith("# exit code 3\n")
    out, err = capfd.readouterr()
    assert "progress" in out and "error: data/x.parquet" in err  # streamed to the terminal too
    assert not _alive(int((tmp_path / "stray.pid").read_text()))  # the stray sleep died with its group


def test_error_line_prefers_the_stage_message_over_dvc_summary():
    from metadqn.procs import error_line, stage_exit_code

    lines = ["12:00:01 prefect.flow_runs Beginning flow run", "error: params.yaml: bad value",
             "ERROR: failed to reproduce 'collect': failed to run: metadqn collect, exited with 2"]
    assert error_line(lines) == "error: params.yaml: bad value"
    assert stage_exit_code(lines, 255) == 2
    assert error_line(["/bin/bash: line 1: metadqn: command not found", lines[-1]]).endswith("command not found")
    assert error_line([lines[-1]]) == lines[-1] and error_line([]) == ""
    assert stage_exit_code(["something"], 255) == 255
