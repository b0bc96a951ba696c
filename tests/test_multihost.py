"""Multi-host training for real: two processes on this machine, two CPU devices each,
joined by jax.distributed (experiments/train.py --distributed), against one process
with four devices. Same mesh (4×1×1), same losses; checkpoints written by both."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from repo import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(workdir, *extra):
    # Adam's first step is g / (|g| + eps): with eps = 1e-8 it turns gradient entries that are
    # round-off (terms that cancel, summed in another order by another device layout) into
    # steps of ±lr, and the second step's samples, hence its loss, then differ between 1 and 4
    # devices in one process alone (-0.36 against -1.15). With eps = 1e-6 they stay round-off.
    return [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config=configs/smollm2_sentiment.py:smoke",
            "--config.mesh.shape=(-1,1,1)", "--config.steps=2", "--config.eval_every=2", "--config.adam.eps=1e-6",
            f"--config.workdir={workdir}", *extra]


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    single = tmp_path / "single"
    subprocess.run(_command(single), env=_env(4), cwd=ROOT, check=True, capture_output=True, timeout=600)

    multi, port = tmp_path / "multi", _free_port()
    procs = [subprocess.Popen(_command(multi, "--distributed", f"--coordinator_address=localhost:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                              env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "process 1 of 2: 2 local devices, 4 in all" in outputs[1]
    np.testing.assert_allclose(_train_losses(multi), _train_losses(single), rtol=1e-4, atol=1e-5)
    # Each process wrote its own array shards into the one checkpoint.
    metadata = multi / "checkpoints" / "2" / "default" / "array_metadatas"
    assert sorted(os.listdir(metadata)) == ["process_0", "process_1"]
