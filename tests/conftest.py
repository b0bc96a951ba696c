"""Fakes 8 CPU devices before JAX is imported (sharding tests need a mesh), and sets how the tests compile."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"].split(",")[0] != "cpu":
    # On an accelerator (`make test-gpu`: JAX_PLATFORMS=cuda,cpu): float32 matmuls in full
    # float32, not TF32 (JAX's GPU default), so the exact-answer tests compare the maths at
    # their float32 tolerances; and deterministic GPU reductions, so "same seed, same result"
    # holds bit for bit as on CPU.
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    os.environ["XLA_FLAGS"] += " --xla_gpu_deterministic_ops=true"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several pytest workers share the GPU
elif "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    # The tests' tiny programs are compile-bound (XLA's backend compile was 59% of test_train.py's
    # time), and LLVM without optimisation saves more in compiling than its code loses in running:
    # the default run in 8:50 against 12:24, the slow tests in 6:01 against 7:31 (2-core AMD Zen 3 host).
    # It changes only LLVM's code generation: XLA's HLO passes, fusions and buffer plans, and the
    # library calls that do the products, stay as they are. To test at XLA's default level, set
    # XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=3".
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

from repo import ROOT  # noqa: E402
for path in (ROOT, os.path.join(ROOT, "experiments")):
    if path not in sys.path:
        sys.path.insert(0, path)

# Prepared prompt datasets go to a throwaway folder, not ~/.cache.
import tempfile  # noqa: E402

_DATA_DIR = None
if "FDRL_DATA_DIR" not in os.environ:
    _DATA_DIR = os.environ["FDRL_DATA_DIR"] = tempfile.mkdtemp(prefix="fdrl_tfds_")

# `make test` runs two pytest-xdist workers; they start after this file has set the variables
# here in the controller, so they inherit its two folders (fdrl.data locks a dataset while
# preparing it) and only the controller removes them.
# One XLA compilation cache for the test session (subprocesses inherit it): many tests build the
# same smoke trainer, and each of its functions is then compiled once, not per test
# (`make test` in a clean clone on a 2-core AMD host: 11:56 against 14:39 and 16:20 without it).
# Set JAX_COMPILATION_CACHE_DIR yourself to keep a cache across sessions.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdrl_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_configure(config):
    """With JAX_PLATFORMS naming an accelerator first, stop at once, with the fix, where JAX
    cannot start it: with `cuda,cpu` JAX falls back to the CPU quietly, and the run would
    test the CPU while saying it tested the GPU."""
    platforms = os.environ["JAX_PLATFORMS"]
    wanted = platforms.split(",")[0]
    if wanted == "cpu":
        return
    import jax
    import pytest

    try:
        backend = jax.default_backend()
    except RuntimeError as e:
        backend = f"none ({e})"
    if backend != ("gpu" if wanted in ("cuda", "rocm", "gpu") else wanted):
        pytest.exit(f"JAX_PLATFORMS={platforms}, but JAX runs on {backend}: it could not start {wanted!r}. For an "
                    "NVIDIA GPU install JAX's CUDA wheels into the venv: .venv/bin/pip install -U 'jax[cuda13]'",
                    returncode=4)


def pytest_collection_modifyitems(config, items):
    """Skips the tests marked eight_devices where JAX has fewer than 8 devices: the default run
    fakes 8 CPU devices, one accelerator (JAX_PLATFORMS=cuda,cpu) is one."""
    marked = [item for item in items if item.get_closest_marker("eight_devices")]
    if not marked:
        return
    import jax
    import pytest

    if jax.device_count() < 8:
        skip = pytest.mark.skip(reason=f"needs 8 devices, JAX has {jax.device_count()} (the default run fakes 8 CPU "
                                       "devices)")
        for item in marked:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    import shutil

    for folder in (_XLA_CACHE, _DATA_DIR):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama():
    """(config, graphdef, params) of the tiny random Llama with a value head."""
    from flax import nnx

    from fdrl.models import llama

    config = llama.LlamaConfig.tiny(value_head=True)
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    return config, graphdef, params
