"""The CPU pin (metadqn.determinism): what a process gets whatever its environment said, and the refusal when a
library loaded before the pin. The end-to-end check (the tiny pipeline under two CPU settings, same bytes) is
in tests/test_reproduction.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from metadqn.determinism import NATIVE_ENV, PINNED_ENV, TORCH_CAPABILITY

# a machine's environment at its most hostile: every library told to use something else than the pin
HOSTILE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "NPY_DISABLE_CPU_FEATURES": "",
           "ONEDNN_MAX_CPU_ISA": "SSE41", "OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "4"}

PROBE = """
import json, os, sys
{first}
import numpy, torch
from metadqn.determinism import check_pinned, cpu_setting, NotPinned
try:
    check_pinned()
    refused = None
except NotPinned as exc:
    refused = str(exc)
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(), "refused": refused,
                  "setting": cpu_setting(), "env": {{k: os.environ.get(k) for k in {keys!r}}}}}))
"""


def _probe(first: str, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in PINNED_ENV and k != NATIVE_ENV}
    full.update(env)
    code = PROBE.format(first=first, keys=sorted(PINNED_ENV))
    proc = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _native_capability() -> str:
    return _probe("import metadqn", **{NATIVE_ENV: "1"})["capability"]


def test_importing_metadqn_first_pins_every_library_whatever_the_environment_said():
    out = _probe("import metadqn", **HOSTILE)
    assert out["env"] == PINNED_ENV  # every variable overridden, for this process and its children
    assert out["capability"] == TORCH_CAPABILITY
    assert out["refused"] is None
    assert out["setting"] == "avx2-pinned"


def test_native_switch_leaves_the_machine_kernels_and_says_so():
    out = _probe("import metadqn", **{NATIVE_ENV: "1", "ATEN_CPU_CAPABILITY": "default"})
    assert out["capability"] == "DEFAULT" and out["refused"] is None
    assert out["setting"] == "native-default"
    assert out["env"]["MKL_CBWR"] is None


def test_torch_loaded_before_the_pin_is_refused_in_one_line():
    if _native_capability() == TORCH_CAPABILITY:
        pytest.skip("this machine's torch kernels are AVX2 already: loading torch first changes nothing here")
    out = _probe("import torch\nimport metadqn")
    assert out["refused"] is not None and "\n" not in out["refused"]
    assert "loaded before metadqn" in out["refused"] and NATIVE_ENV in out["refused"]


def test_a_dask_worker_environment_carries_the_pin():
    from flows.runners import worker_env

    env = worker_env()
    assert {k: env[k] for k in PINNED_ENV} == PINNED_ENV


def test_no_training_of_the_package_takes_adams_sqrt_from_mkl(monkeypatch):
    """torch's default Adam takes the square root of its second moment from MKL's VML (tensor ``sqrt`` and
    ``_foreach_sqrt``), whose pinned kernel starts from an approximate instruction that Intel and AMD round
    differently: siamese's encoder came out different on the two (2026-11-29). Every Adam of the package is
    the fused one (``make_optimizer``), which never calls them; here they raise."""
    import numpy as np
    import torch

    from metadqn.envs import get_family
    from metadqn.meta.context import ContextSampler, build_encoder, feature_dim
    from metadqn.meta.siamese import fit_siamese

    def vml(*args, **kwargs):
        raise AssertionError("an Adam step took its sqrt from torch's sqrt ops (MKL VML on CPU)")

    family = get_family("cartpole")
    rng = np.random.default_rng(0)
    sampler = ContextSampler([rng.standard_normal((40, feature_dim(family))).astype(np.float32)
                              for _ in range(3)], 16)
    encoder = build_encoder("deepset", family, 16, 4, False)
    for name in ("sqrt", "_foreach_sqrt", "_foreach_sqrt_"):
        monkeypatch.setattr(torch, name, vml, raising=False)
    monkeypatch.setattr(torch.Tensor, "sqrt", vml)
    monkeypatch.setattr(torch.Tensor, "sqrt_", vml)
    fit = fit_siamese(encoder, sampler, np.eye(3, dtype=np.float32), 3, 1e-3, 0)
    assert len(list(fit.encoder.parameters())) > 0
