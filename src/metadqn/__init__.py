"""metadqn: reproducible meta-reinforcement-learning with deep Q-learning.

Importing the package switches off every phone-home of the stack (Prefect, MLflow, DVC analytics) unless
the user set the variables already, and points Prefect at a project-local home so that a run never
touches ``~/.prefect``. It also pins the CPU code paths of torch, MKL, oneDNN, numpy and OpenBLAS
(:mod:`metadqn.determinism`), so that the same params and code give the same bytes on any x86-64 machine.
"""

from __future__ import annotations

import os
from pathlib import Path

# MLflow only honours the literal string "true".
_OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
}
for _key, _value in _OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
# Prefect waits 20 s for the temporary API server a flow starts when no server is named; on a loaded
# 2-core machine (a replicate run beside the test suite) it took longer, and 3 tests failed on that
# timeout alone. A server that never comes up still ends in one line, after 2 minutes.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# before torch or numpy loads anywhere: their CPU kernels pinned for byte-identical results across machines
from metadqn.determinism import pin_environment  # noqa: E402

pin_environment()

__version__ = "0.1.0"
