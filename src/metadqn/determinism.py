"""The same bytes on any x86-64 machine with AVX2 (Intel or AMD): every CPU-dependent code path pinned.

torch, MKL, oneDNN, numpy and OpenBLAS each pick their kernels at run time from the CPU they find (AVX2,
AVX-512, ...). Two kernels of one operation can round differently, and a near-tie between two Q-values
turns a last-bit difference into another action, another episode and, by the end of training, another
network. Measured on this project's machine (AVX-512): numpy's float64 ``exp`` and ``log1p`` give other
bits with its AVX-512 kernels switched off, and the tiny pipeline's outputs differ between torch's AVX2 and
AVX-512 dispatch. So the package pins every library to its AVX2 path, the widest one every supported
machine has, through the environment variables each library reads *once, when it loads*. MKL is the
exception: Intel documents its AVX2 reproducibility branch for Intel CPUs only, and identical results on
Intel *and* compatible (AMD) CPUs for the ``COMPATIBLE`` branch alone, so MKL runs that one (its SSE2
kernels; the cost is measured by ``bench/determinism_cost.py``: about 1.2x on DQN training, 1.4x on a
hypernetwork-sized fit, against the machine's native kernels).

:func:`pin_environment` runs when ``metadqn`` is imported (``metadqn/__init__.py``), which is before any
of these libraries in every entry point: the CLI and so ``dvc repro``, the Prefect flows, the worker
processes (they inherit the environment), and the tests (``tests/conftest.py`` imports metadqn first).
It overrides what the caller set: a user's ``ATEN_CPU_CAPABILITY=avx512`` would otherwise silently give
other bytes than the committed ``dvc.lock``. :func:`check_pinned` runs at the start of every stage and
worker and refuses in one line when a library was loaded before the pin (e.g. a Dask worker that imported
torch on its own).

Thread counts are the other machine-dependent input (a reduction split over more threads adds in another
order, and MKL's reproducible mode holds only for a fixed thread count): they come from params
(``dqn.torch_threads`` in a stage process, ``runner.threads`` in workers), never from the core count.

``METADQN_NATIVE_CPU=1`` turns the pin off (each library uses the fastest kernels of the machine). Outputs
are then reproducible on that machine only; ``bench/determinism_cost.py`` measures what the pin costs.

What stays outside the pin: the Python interpreter's ``math`` module and the C library (the environments
use numpy, not ``math``), and a different build of any dependency (``constraints.txt`` pins them all).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from metadqn.errors import UserError

NATIVE_ENV = "METADQN_NATIVE_CPU"
"""Set to 1 to leave every library on the machine's fastest kernels (no cross-machine reproduction)."""

TORCH_CAPABILITY = "AVX2"
"""What ``torch.backends.cpu.get_cpu_capability()`` reports under the pin."""

PINNED_ENV: dict[str, str] = {
    # torch's own vectorised kernels (ATen's CPU dispatch)
    "ATEN_CPU_CAPABILITY": TORCH_CAPABILITY.lower(),
    # MKL (torch's BLAS): conditional numerical reproducibility on the COMPATIBLE code path, the one Intel
    # documents as giving the same results on Intel and AMD CPUs (its AVX2 branch: Intel CPUs only); STRICT
    # drops the alignment condition; no dynamic change of the thread count
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "MKL_DYNAMIC": "FALSE",
    # oneDNN (torch's mkldnn ops)
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    # numpy's SIMD dispatch: X86_V4 is its AVX-512 baseline (numpy >= 2.3 names), the others its extra
    # AVX-512 targets; the pre-2.3 names are listed too (an unknown name is ignored)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512_SKX AVX512_CLX AVX512_CNL",
    # numpy's and scipy's OpenBLAS: the Haswell (AVX2) kernels, one thread
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENBLAS_NUM_THREADS": "1",
}


class NotPinned(UserError, RuntimeError):
    """A library was loaded before the pin took effect; the message is one line, ready to print."""


def native() -> bool:
    """True when the user turned the pin off (``METADQN_NATIVE_CPU=1``)."""
    return os.environ.get(NATIVE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def pin_environment() -> None:
    """Sets :data:`PINNED_ENV` in this process's environment (inherited by every child), unless native."""
    if native():
        return
    os.environ.update(PINNED_ENV)


def cpu_setting() -> str:
    """What the numbers of this process depend on: ``avx2-pinned`` or ``native-<torch capability>``."""
    if native():
        import torch

        return f"native-{torch.backends.cpu.get_cpu_capability().lower()}"
    return f"{TORCH_CAPABILITY.lower()}-pinned"


def check_pinned() -> None:
    """Refuses (:class:`NotPinned`) when torch or numpy in this process is not on its pinned code path."""
    if native():
        return
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    # a machine without AVX2 runs below the pin and cannot give the committed bytes either
    if capability != TORCH_CAPABILITY:
        raise NotPinned(
            f"torch runs its {capability} kernels, not {TORCH_CAPABILITY}: it was loaded before metadqn pinned "
            f"ATEN_CPU_CAPABILITY (or this CPU lacks AVX2); import metadqn first, or set "
            f"{NATIVE_ENV}=1 to accept machine-specific results")
    import importlib

    features: dict[str, bool] = {}
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # numpy 2, numpy 1
        try:
            features = importlib.import_module(name).__cpu_features__
            break
        except (ImportError, AttributeError):
            continue
    if features.get("X86_V4") or features.get("AVX512_SKX"):
        raise NotPinned(
            "numpy runs its AVX-512 kernels: it was loaded before metadqn set NPY_DISABLE_CPU_FEATURES; "
            f"import metadqn first, or set {NATIVE_ENV}=1 to accept machine-specific results")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block (the previous count restored after).

    For the computations whose bits depend on the thread count: the hypernetwork's output layer (256 x ~4.7k)
    is large enough that MKL splits its products across threads, so a hypernet seed trained in a worker of
    one thread and in a stage process of two gave different networks (measured: validation 0.748 vs 0.763 on
    the same seed). The DQN-sized networks are computed on one thread either way (``tests/test_fanout.py``).
    Inside this block a job gives the same bytes whatever runner runs it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
