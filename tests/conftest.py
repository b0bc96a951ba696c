"""Fakes 8 CPU devices before JAX is imported (sharding tests need a mesh)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "experiments")):
    if path not in sys.path:
        sys.path.insert(0, path)

# Prepared prompt datasets go to a throwaway folder, not ~/.cache.
import tempfile  # noqa: E402

os.environ.setdefault("FDRL_DATA_DIR", tempfile.mkdtemp(prefix="fdrl_tfds_"))
