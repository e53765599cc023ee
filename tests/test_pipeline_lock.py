from __future__ import annotations

import subprocess
import sys

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
