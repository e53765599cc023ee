"""The pipeline flow: brings the DVC pipeline up to date, stage by stage, through DVC.

DVC decides what is stale (``dvc repro <stage>`` is a no-op for an up-to-date stage); Prefect only
sequences and records. Stages run one at a time because DVC holds a repository lock.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

STAGES = ("collect", "meta_train", "meta_test", "report")


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro(stage: str) -> None:
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", "repro", stage]
    subprocess.run(cmd, check=True)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(stages: tuple[str, ...] = STAGES) -> None:
    for stage in stages:
        dvc_repro(stage)
    print("pipeline up to date; report: reports/report.html (metrics: reports/metrics.json)")


if __name__ == "__main__":
    pipeline_flow()
