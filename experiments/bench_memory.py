r"""Peak resident memory of the trainer (f-DPG, or PPO), phase by phase (Linux).

  python experiments/bench_memory.py                 # SmolLM2, batch 32 × 32 new tokens, on-policy js
  python experiments/bench_memory.py --model=tiny
  python experiments/bench_memory.py --batch=64 --microbatch=32   # gradient accumulation
  python experiments/bench_memory.py --algo=ppo --microbatch=8    # PPO-RLHF, scored and differentiated 8 at a time

The process's peak (VmHWM in /proc/self/status) is reset between phases by writing
5 to /proc/self/clear_refs, so each row is the peak of that phase alone: loading,
compiling ahead (Trainer.compile, as the training loop does before the state exists),
the train state, the first sampling call, the first trainer step, then --steps steps
and --steps sampling calls after them (their largest peak). Freed heap is released between phases, as the training
loop does. With --microbatch the step samples and differentiates its batch that many at a
time (config.microbatch_size) and the sampling rows are a microbatch's. Writes
experiments/results/bench_memory{,_tiny}{,_ppo,_fppo}{,_b<batch>}{,_micro<n>}.md.
"""

import os
import statistics
import time

from absl import flags

import common
import jax

from configs import smollm2_sentiment
from fdrl import host_memory, train

_MODEL = flags.DEFINE_enum("model", "smollm2", ["smollm2", "tiny"], "Model to measure.")
_BATCH = flags.DEFINE_integer("batch", 32, "Samples per step.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "New tokens per sample.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 0, "config.eval_batch_size (its sampler and reference scoring are "
                                   "compiled ahead); 0 = --batch, sharing the training sampler's executable.")
_MICRO = flags.DEFINE_integer("microbatch", 0, "config.microbatch_size: samples per sampling call and per "
                              "gradient pass of a step (gradient accumulation); 0 = the whole --batch.")
_ALGO = flags.DEFINE_enum("algo", "fdpg", list(train.ALGOS), "config.algo: f-DPG (js), or PPO-RLHF / f-PPO with "
                          "the config's ppo.epochs and ppo.minibatches.")
_STEPS = flags.DEFINE_integer("steps", 2, "Steps (and sampling calls) after the first, for the steady peaks.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Output folder.")


def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9  # kB (KiB) → GB
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def main(argv):
    del argv
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("bench_memory needs Linux (/proc/self/clear_refs to reset the peak)")
    rows = []

    def phase(name):
        rows.append([name, f"{_status_gb('VmHWM'):.2f}", f"{_status_gb('VmRSS'):.2f}"])
        host_memory.release_free_heap()
        _reset_peak()

    config = smollm2_sentiment.get_config()
    config.update(dict(model=_MODEL.value, batch_size=_BATCH.value, eval_batch_size=_EVAL_BATCH.value or _BATCH.value,
                       max_new_tokens=_NEW.value, f="js", progress_bar=False, microbatch_size=_MICRO.value,
                       algo=_ALGO.value))
    sample_rows = config.batch_size // train.num_microbatches(config)  # what one of the step's sampling calls draws
    trainer = train.Trainer(config)
    phase("load (runtime, tokenizer, prompts, reference)")
    trainer.compile()
    phase("compile ahead (update, sampler, scoring; no train state yet)")
    state = jax.block_until_ready(trainer.init_state())
    phase("train state (policy, Adam moments)")

    def sample(i):
        out = trainer.sample(state.params, jax.random.PRNGKey(i), sample_rows)
        jax.block_until_ready(out)

    sample(0)
    phase("first sampling call")
    state, scalars = trainer.step(state)
    float(scalars["loss"])
    phase("first trainer step")
    steps, samples, seconds = [], [], []
    for i in range(_STEPS.value):
        start = time.perf_counter()
        state, scalars = trainer.step(state)
        float(scalars["loss"])
        seconds.append(time.perf_counter() - start)
        steps.append(_status_gb("VmHWM"))
        host_memory.release_free_heap()
        _reset_peak()
    for i in range(_STEPS.value):
        sample(i + 1)
        samples.append(_status_gb("VmHWM"))
        host_memory.release_free_heap()
        _reset_peak()
    rows.append([f"trainer step (largest of {_STEPS.value})", f"{max(steps):.2f}", ""])
    rows.append([f"sampling call of {sample_rows} (largest of {_STEPS.value})", f"{max(samples):.2f}", ""])
    # What XLA plans for the update: its arguments (reference + train state) and temporaries.
    batch = trainer.step_batch(state.params, jax.random.PRNGKey(0))
    eval_rows = train.eval_chunk_size(config)
    algo_text = ("on-policy js" if config.algo == "fdpg" else
                 f"{config.algo} ({config.ppo.epochs} epochs × {config.ppo.minibatches} minibatches)")
    plan = trainer._update.lower(trainer.task.ref_params, trainer.abstract_state, *batch).compile().memory_analysis()
    report = "\n".join([
        f"# Trainer memory by phase: {_MODEL.value}, batch {config.batch_size} × {config.max_new_tokens} new tokens"
        f"{f' in microbatches of {_MICRO.value}' if _MICRO.value else ''}, {algo_text}", "",
        f"Command: `python experiments/bench_memory.py --model={_MODEL.value}"
        f"{f' --algo={_ALGO.value}' if _ALGO.value != 'fdpg' else ''}"
        f"{f' --batch={_BATCH.value}' if _BATCH.value != 32 else ''}"
        f"{f' --microbatch={_MICRO.value}' if _MICRO.value else ''}"
        f"{f' --eval_batch={_EVAL_BATCH.value}' if _EVAL_BATCH.value else ''}`", "",
        f"Evaluation batch {config.eval_batch_size}"
        + (f" in chunks of {eval_rows}" if eval_rows != config.eval_batch_size else "")
        + (" (= the training sampler's rows: evaluation samples with its executable; each further "
           "compiled sampler stays resident, ~0.1 GB on SmolLM2)." if eval_rows == sample_rows
           else " (its sampler is a second executable: ~0.1 GB resident on SmolLM2)."), "",
        f"jax {jax.__version__}, {os.cpu_count()} cores; remat {config.remat}, quantized_reference "
        f"{config.quantized_reference} (SmolLM2 only). GB = 10⁹ bytes.{common.heap_note()}", "",
        common.markdown_table(["phase", "peak GB", "resident after, GB"], rows), "",
        f"XLA's memory analysis of the update (`compile().memory_analysis()`): arguments "
        f"{plan.argument_size_in_bytes / 1e9:.2f} GB (reference, train state, batch), temporaries "
        f"{plan.temp_size_in_bytes / 1e9:.2f} GB (gradients, logits, saved activations), outputs "
        f"{plan.output_size_in_bytes / 1e9:.2f} GB of which {plan.alias_size_in_bytes / 1e9:.2f} GB alias the "
        "donated state.", "",
        f"The {_STEPS.value} steps after the first took {statistics.median(seconds):.2f} s each (median; sampling, "
        "host scoring and the update, as the training loop runs them; compare times within one host's runs).",
    ])
    suffix = ("" if _MODEL.value == "smollm2" else f"_{_MODEL.value}") + (
        f"_{_ALGO.value}" if _ALGO.value != "fdpg" else "") + (
        f"_b{_BATCH.value}" if _BATCH.value != 32 else "") + (f"_micro{_MICRO.value}" if _MICRO.value else "")
    common.write_results(_OUT.value, f"bench_memory{suffix}", report)


if __name__ == "__main__":
    common.run(main)
