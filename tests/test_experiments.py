"""The entry points run end to end on tiny settings and write what they promise."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import compare
from configs import toy as toy_config
from repo import ROOT


def test_train_entry_point(tmp_path):
    out = subprocess.run(
        [sys.executable, "experiments/train.py", "--config=configs/toy.py:smoke", "--config.f=alpha",
         "--config.alpha=0.3", "--config.target=rlhf", f"--config.workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| kl_p_pi |" in out.stdout
    (path,) = tmp_path.glob("train_rlhf_tabular_alpha.json")
    history = json.loads(path.read_text())["history"]
    assert history["objective"][0][-1] < history["objective"][0][0]


# absl's log-line prefix: level letter, month and day ("I1125 14:17:45.605465 ...").
_ABSL_INFO_LINE = re.compile(r"^I\d{4} ", re.M)


def test_library_info_logs_only_with_verbosity():
    # Every entry point runs its main through common.run: INFO logs hidden, warnings shown,
    # and -v 0 brings INFO back.
    script = ("import common; from absl import logging; "
              "common.run(lambda argv: logging.info('info probe') or logging.warning('warning probe'))")
    run = lambda *flags: subprocess.run([sys.executable, "-c", script, *flags], cwd=os.path.join(ROOT, "experiments"),
                                        capture_output=True, text=True, timeout=120)
    quiet, loud = run(), run("--verbosity=0")
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-3000:] + loud.stderr[-3000:]
    assert "warning probe" in quiet.stderr and "info probe" not in quiet.stderr
    assert "warning probe" in loud.stderr and _ABSL_INFO_LINE.search(loud.stderr) and "info probe" in loud.stderr
    for script in pathlib.Path(ROOT, "experiments").glob("*.py"):
        if "__main__" in script.read_text():
            assert "common.run(main)" in script.read_text() and "app.run(" not in script.read_text(), script


def test_train_rejects_bad_flag_values():
    out = subprocess.run([sys.executable, "experiments/train.py", "--config=configs/toy.py:smoke", "--config.f=kl"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "unknown f-divergence f='kl'" in out.stderr


def test_compare_writes_table_and_plot(tmp_path):
    config = toy_config.get_config("smoke")
    sweep = [dict(target="pointwise", family="shared", f="fkl"), dict(target="pointwise", family="shared", f="rkl")]
    results = compare.run_sweep(config, sweep)
    compare.write_table(config, results, tmp_path / "t.md")
    compare.write_plot(results, tmp_path / "t.png")
    table = (tmp_path / "t.md").read_text()
    assert "## target=pointwise, policy=shared" in table and "| rkl |" in table and "nan" not in table
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_sweep_covers_the_comparison():
    sweep = toy_config.get_sweep()
    fs = {s["f"] for s in sweep}
    assert {"fkl", "rkl", "js", "tv"} <= fs and len([f for f in fs if f.startswith("alpha=")]) >= 3
    assert {s["target"] for s in sweep} == {"pointwise", "rlhf", "distributional"}


def test_sweep_entry_point_trains_each_entry_once_and_summarises(tmp_path):
    def sweep(*flags):
        return subprocess.run([sys.executable, "experiments/sweep.py", "--config=configs/smollm2_sentiment.py:smoke",
                               f"--config.workdir={tmp_path}", "--only=js,ppo-rlhf", *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)

    out = sweep(f"--prefix={tmp_path / 'cmp'}")
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "cmp.md").read_text()
    assert "# Sweep of configs/smollm2_sentiment.py:smoke: target=rlhf, 4 steps × batch 4, 1 seed per run" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| run", "| (start: π = a)", "| js", "| ppo-rlhf"]
    assert "nan" not in table and "Samples after training, ppo-rlhf (seed 0):" in table
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    runs = json.loads((tmp_path / "cmp.json").read_text())["runs"]
    assert [(r["label"], [e["step"] for e in r["history"]]) for r in runs] == [("js", [0, 2, 4]), ("ppo-rlhf", [0, 2, 4])]
    assert sorted(os.listdir(tmp_path / "sweep")) == ["js", "ppo-rlhf"]
    # The same command again trains nothing; the default summary goes beside the runs.
    again = sweep()
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 2 and "samples before training" not in again.stdout
    assert (tmp_path / "sweep" / "summary.md").read_text().split("Command:")[1].count("| js |") == 1
    wrong = subprocess.run([sys.executable, "experiments/sweep.py", "--config=configs/toy.py:smoke"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "experiments/compare.py" in wrong.stderr


def _train_smoke_run(workdir):
    out = subprocess.run(
        [sys.executable, "experiments/train.py", "--config=configs/smollm2_sentiment.py:smoke", "--config.f=js",
         f"--config.workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_train_entry_point_on_the_lm_path(tmp_path):
    out = _train_smoke_run(tmp_path)
    assert "samples before training" in out.stdout and "samples after training" in out.stdout
    assert not _ABSL_INFO_LINE.search(out.stderr), out.stderr[-3000:]  # orbax's and tfds' INFO logs
    assert "| kl_p_pi |" in out.stdout
    assert (tmp_path / "metrics.png").stat().st_size > 5_000 and (tmp_path / "summary.md").exists()
    # The run's checkpoint, sampled beside the base model.
    out = subprocess.run(
        [sys.executable, "experiments/sample.py", "--config=configs/smollm2_sentiment.py:smoke",
         f"--config.workdir={tmp_path}", "--prompt=Describe your morning.", "--num_samples=2",
         f"--out={tmp_path / 'samples.jsonl'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "## Describe your morning." in out.stdout and "[policy step 4] score" in out.stdout
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["model"], r["step"]) for r in records] == [("base", 0)] * 2 + [("policy", 4)] * 2
    out = subprocess.run([sys.executable, "experiments/sample.py", "--config=configs/smollm2_sentiment.py:smoke",
                          f"--config.workdir={tmp_path / 'none'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode != 0 and "no checkpoints in workdir=" in out.stderr
    out = subprocess.run([sys.executable, "experiments/sample.py", "--config=configs/smollm2_sentiment.py:smoke",
                          f"--config.workdir={tmp_path}", "--step=3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode != 0 and "no checkpoint of step=3 in" in out.stderr and "it holds steps" in out.stderr
    out = subprocess.run([sys.executable, "experiments/sample.py", "--config=configs/smollm2_sentiment.py:smoke",
                          "--qrs_acceptance=1.5"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "--qrs_acceptance=1.5 must be in (0, 1]" in out.stderr


# Trains its own run first: with the slow tests (the default run's 15 minutes); tests/test_qrs.py
# tests the sampler itself in the default run.
@pytest.mark.slow
def test_sample_entry_point_with_quasi_rejection_sampling(tmp_path):
    _train_smoke_run(tmp_path)
    # Quasi-rejection sampling of p, with a and the run's policy as proposals.
    out = subprocess.run(
        [sys.executable, "experiments/sample.py", "--config=configs/smollm2_sentiment.py:smoke",
         f"--config.workdir={tmp_path}", "--prompt=Describe your morning.", "--num_samples=2", "--qrs_acceptance=0.5",
         "--qrs_pilot=8", "--qrs_batch=8", "--qrs_max_draws=16", f"--out={tmp_path / 'qrs.jsonl'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| base step 0 |")
            or line.startswith("| policy step 4 |")]
    assert len(rows) == 2 and all(" | Describe your morning. | " in r and "nan" not in r for r in rows), out.stdout
    records = [json.loads(line) for line in (tmp_path / "qrs.jsonl").read_text().splitlines()]
    assert records and all("qrs_log_beta" in r for r in records)
    assert all(sum(r["model"] == m for r in records) <= 2 for m in ("base", "policy"))


def _run_tiny_benchmark(script, out_dir, *flags):
    """Runs experiments/<script> on the tiny model at batch 8 × 4 new tokens, writing to out_dir."""
    out = subprocess.run([sys.executable, f"experiments/{script}", "--model=tiny", "--batch=8", "--new_tokens=4",
                          *flags, f"--out={out_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


# Slow on a 2-core CPU (20–55 s each); `make test-slow` runs it, keeping the default run under 15 minutes.
# Whole batches of 8 with a second evaluation sampler; batches of 16 in microbatches of 8, evaluated in them;
# PPO on 32 in microbatches of 8 (its minibatches of 16 differentiated 8 at a time).
@pytest.mark.slow
@pytest.mark.parametrize("flags, report_name, expected", [
    ((), "bench_memory_tiny_b8.md", ("--batch=8 --eval_batch=16`", "batch 8 × 4 new tokens, on-policy js",
                                     "Evaluation batch 16 (its sampler")),
    (("--batch=16", "--microbatch=8"), "bench_memory_tiny_b16_micro8.md",
     ("--batch=16 --microbatch=8 --eval_batch=16`", "batch 16 × 4 new tokens in microbatches of 8",
      "Evaluation batch 16 in chunks of 8 (= the training sampler's rows")),
    (("--algo=ppo", "--batch=32", "--microbatch=8"), "bench_memory_tiny_ppo_micro8.md",
     ("--algo=ppo --microbatch=8 --eval_batch=16`",
      "batch 32 × 4 new tokens in microbatches of 8, ppo (2 epochs × 2 minibatches)",
      "Evaluation batch 16 in chunks of 8 (= the training sampler's rows")),
], ids=["whole", "microbatches", "ppo-microbatches"])
def test_memory_benchmark_reports_every_phase(flags, report_name, expected, tmp_path):
    _run_tiny_benchmark("bench_memory.py", tmp_path, "--steps=1", "--eval_batch=16", *flags)
    report = (tmp_path / report_name).read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "GB" not in line]
    assert [r[0].lstrip("| ") for r in rows][-2:] == ["trainer step (largest of 1)",
                                                      "sampling call of 8 (largest of 1)"]
    peaks = [float(r[1]) for r in rows]
    assert len(peaks) == 7 and all(0.1 < p < 24 for p in peaks)
    assert "temporaries" in report and " s each (median" in report
    for text in expected:
        assert text in report, text


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_benchmark_reports_every_part(dtype, tmp_path):
    _run_tiny_benchmark("bench_step.py", tmp_path, "--repeats=1", f"--dtype={dtype}")
    name = "bench_step_tiny" + ("" if dtype == "float32" else "_bfloat16")
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert [row[0] for row in result["rows"]] == ["sample", "host: decode + score", "reference", "policy fwd+bwd",
                                                  "adam update"]
    assert all(seconds > 0 and (flops > 0) == (name != "host: decode + score")
               for name, seconds, flops, _ in result["rows"])
    # The fractions use the highest of the three matmul measurements.
    rates = result["matmul_flops_per_s_measured"]
    assert len(rates) == 3 and result["matmul_flops_per_s"] == max(rates) > 1e9
    assert 0.1 < result["peak_rss_gb"] < 24 and result["step_minor_faults"] >= 0
    # The Adam part's donated buffers pair with its own outputs: with (params, opt_state)
    # returned for (opt_state, params) donated, the new parameters took the second moment's
    # buffers and the temporaries held two copies of the parameters (float32) or 1.5 (bfloat16).
    assert 0 < result["adam_temp_bytes"] <= 1.05 * result["param_f32_bytes"]
    report = (tmp_path / f"{name}.md").read_text()
    assert "the highest of" in report and f"2048³ {dtype} matmul" in report
    assert "at batch 8 and at the evaluation's 8)" in report  # --eval_batch=0: the training batch
    assert "--batch=8 --new_tokens=4" in report.splitlines()[2]  # the command names the non-default flags
    assert result["float32_matmul_flops_per_s"] > 1e9
    assert ("A 2048³ float32 matmul ran at" in report) == (dtype == "bfloat16")


def test_speedup_verdict_judges_unrounded_ratios():
    import common
    # 1.4954 shows as 1.50× in the two-decimal table; the verdict must still say "not met".
    assert common.speedup_verdict({"batch 16": 1.4954, "batch 64": 1.58}, 1.5) == \
        "not met (batch 16 1.495×, batch 64 1.580×)"
    assert common.speedup_verdict({"batch 16": 1.5, "batch 64": 1.58}, 1.5).startswith("met (")


def test_heap_note_names_tunables_only_when_set():
    import common
    assert common.heap_note({}) == ""
    assert common.heap_note({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == \
        " C heap: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (not a default)."


def test_fixed_drops_the_minus_of_a_rounded_zero():
    import common
    # KL(π‖a) at step 0 is a Monte Carlo mean of exact zeros and rounding: -1e-7 prints 0.0000.
    assert common.fixed(-1e-7) == "0.0000"
    assert common.fixed(-0.0) == "0.0000"
    assert common.fixed(-0.00005001) == "-0.0001"
    assert common.fixed(1.23456) == "1.2346"
    assert common.fixed(-2.5, 2) == "-2.50"
    assert [common.fixed(x) for x in (float("inf"), float("-inf"))] == ["inf", "-inf"]
    assert common.fixed(float("nan")) == "nan"
