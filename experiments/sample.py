r"""Samples from a trained policy (a run's checkpoint) beside the base model, prompt by prompt.

  python experiments/sample.py --config=configs/smollm2_sentiment.py --prompt="Describe your morning."
  python experiments/sample.py --config=configs/smollm2_word.py --config.workdir=runs/a --step=50 \
      --prompt="Write a review." --prompt="Tell me a story." --num_samples=4
  python experiments/sample.py --config=configs/smollm2_sentiment.py --base       # the base model a only
  python experiments/sample.py --config=configs/smollm2_word.py --config.workdir=runs/a --qrs_acceptance=0.1

The config is the run's (same file, variant and flags: the model, the target and the
workdir); sampling follows its temperature and top-p (`--config.temperature=0.7`).
Without --prompt the first --num_prompts of the config's prompt set are used. Each
completion is printed with its score under the target's scorer and its log-probability
under the policy and under a (log π − log a: how much more likely training made it);
--out writes the records as JSON lines.

With --qrs_acceptance (or --qrs_log_beta) each model is a proposal q for quasi-rejection
sampling of the target p (fdrl.qrs): draws of q at temperature 1 are kept with probability
min(1, P/(βq)), β set on --qrs_pilot draws of each prompt so that about that fraction is
kept, until --num_samples are kept or --qrs_max_draws are drawn. The kept completions are
printed with the estimates from the draws after the pilot: the acceptance rate and how far
the kept completions (p_β) and the draws (q) are from p, in TV and KL(p‖·).
"""

import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common  # puts the repo on sys.path
from fdrl import checkpoint, qrs, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file[:variant].")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A user prompt (repeat the flag for several).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 3, "Without --prompt: this many of the config's prompts.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "Completions per prompt, from each model.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint's step (default: the latest in --config.workdir).")
_BASE = flags.DEFINE_bool("base", False, "Sample the base model a only; no checkpoint needed.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "Write the records here as JSON lines.")
_QRS_ACCEPTANCE = flags.DEFINE_float("qrs_acceptance", None, "Quasi-rejection sampling of p, β set for this "
                                     "acceptance rate in (0, 1] on the pilot draws.")
_QRS_LOG_BETA = flags.DEFINE_float("qrs_log_beta", None, "Quasi-rejection sampling of p at this log β (no pilot).")
_QRS_PILOT = flags.DEFINE_integer("qrs_pilot", 64, "Draws per prompt and model that set β (not kept; "
                                  "rounded up to whole sampling calls).")
_QRS_BATCH = flags.DEFINE_integer("qrs_batch", 32, "Draws per sampling call.")
_QRS_MAX_DRAWS = flags.DEFINE_integer("qrs_max_draws", 512, "Draws per prompt and model after the pilot, at most.")


def _models(trainer, step, base_only: bool) -> list:
    """(name, step, params): the base model a and, unless base_only, the run's policy."""
    models = [("base", 0, trainer.task.ref_params)]
    if not base_only:
        state = train.restore_run(trainer, step=step, params_only=True)
        models.append(("policy", int(state.step), state.params))
    return models


def sample_run(config, prompts, num_samples: int, step=None, base_only: bool = False, seed: int = 0) -> list[dict]:
    """Records of Trainer.generate for the base model a and (unless base_only) the policy of
    config.workdir's checkpoint at `step` (latest by default), each with "model" and "step"."""
    trainer = train.Trainer(config)
    key = jax.random.PRNGKey(seed)
    records = []
    for i, (name, at, params) in enumerate(_models(trainer, step, base_only)):
        for r in trainer.generate(params, prompts, jax.random.fold_in(key, i), num_samples):
            records.append(dict(model=name, step=at, **r))
    return records


def qrs_prompt(trainer, params, prompt: str, key, num_samples: int, acceptance=None, log_beta=None,
               pilot: int = 64, batch: int = 32, max_draws: int = 512) -> tuple[list[dict], dict]:
    """Quasi-rejection sampling of p for one prompt with `params` as the proposal q
    (fdrl.qrs): (kept records, estimates). β is `log_beta`, or set on `pilot` draws so
    that `acceptance` of them would be kept; the estimates come from the draws after."""
    if trainer.config.top_k:
        raise ValueError(f"quasi-rejection sampling needs q > 0 wherever p > 0: sample with top_k=0, "
                         f"not top_k={trainer.config.top_k}")

    def draw(k):
        records = trainer.generate(params, [prompt], k, batch, temperature=1.0, top_p=1.0)
        if records[0]["log_potential"] is None:
            raise ValueError("quasi-rejection sampling needs the target's λ: sample a trained run's workdir "
                             "(it saves the fitted λ), not --base")
        log_P = np.array([r["ref_logp"] + r["log_potential"] for r in records], np.float32)
        return records, log_P, np.array([r["policy_logp"] for r in records], np.float32)

    pilot_key, key = jax.random.split(key)
    if log_beta is None:
        draws = [draw(jax.random.fold_in(pilot_key, i)) for i in range(-(-pilot // batch))]
        log_P, proposal_logp = (np.concatenate([d[j] for d in draws]) for j in (1, 2))
        if not np.isfinite(log_P).any():
            raise ValueError(f"none of the {len(log_P)} pilot draws for {prompt!r} has P > 0, so no β can be "
                             "set: draw more (--qrs_pilot) or use a proposal closer to p")
        log_beta = float(qrs.log_beta_for_acceptance(log_P, proposal_logp, acceptance))
    out = qrs.sample_until(draw, key, log_beta, num_samples, max_draws)
    estimates = {k: float(v) for k, v in qrs.diagnostics(out.log_P, out.proposal_logp, log_beta).items()}
    summary = dict(prompt=prompt, log_beta=float(log_beta), drawn=len(out.kept), kept=int(out.kept.sum()),
                   kept_fraction=float(out.kept.mean()), **estimates)
    return [dict(r, qrs_log_beta=float(log_beta)) for r in out.accepted], summary


def qrs_run(config, prompts, num_samples: int, step=None, base_only: bool = False, seed: int = 0,
            **qrs_args) -> tuple[list[dict], list[dict]]:
    """`qrs_prompt` for every prompt, with the base model a and (unless base_only) the run's
    policy as proposals: (kept records, one summary per model and prompt)."""
    trainer = train.Trainer(config)
    key = jax.random.PRNGKey(seed)
    records, summaries = [], []
    for i, (name, at, params) in enumerate(_models(trainer, step, base_only)):
        for j, prompt in enumerate(prompts):
            kept, summary = qrs_prompt(trainer, params, prompt, jax.random.fold_in(key, i * len(prompts) + j),
                                       num_samples, **qrs_args)
            records += [dict(model=name, step=at, **r) for r in kept]
            summaries.append(dict(model=name, step=at, **summary))
    return records, summaries


def format_qrs(summaries: list[dict]) -> str:
    lines = ["\n| proposal | prompt | log β | drawn | kept | AR estimate | TV(p, q) | TV(p, p_β) | KL(p‖q) "
             "| KL(p‖p_β) | ESS |", "|" + "---|" * 11]
    for s in summaries:
        lines.append(f"| {s['model']} step {s['step']} | {s['prompt'][:40]} | {s['log_beta']:.2f} | {s['drawn']} "
                     f"| {s['kept']} | {s['acceptance_rate']:.3f} | {s['tv_p_q']:.3f} | {s['tv']:.3f} "
                     f"| {s['kl_p_q']:.3f} | {s['kl_p_pbeta']:.3f} | {s['ess']:.1f} |")
    return "\n".join(lines)


def format_records(records: list[dict]) -> str:
    lines = []
    for prompt in dict.fromkeys(r["prompt"] for r in records):
        lines.append(f"\n## {prompt}")
        for r in (r for r in records if r["prompt"] == prompt):
            lines.append(f"[{r['model']} step {r['step']}] score {r['score']:.3f}, log π − log a "
                         f"{r['policy_logp'] - r['ref_logp']:+.2f}: {r['completion']!r}")
    means = {}
    for r in records:
        means.setdefault((r["model"], r["step"]), []).append(r["score"])
    lines.append("\n" + "; ".join(f"{m} step {s}: mean score {np.mean(v):.3f} over {len(v)}"
                                  for (m, s), v in means.items()))
    return "\n".join(lines)


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required: the run's config file, e.g. configs/smollm2_sentiment.py")
    if config.get("task", "toy") != "lm":
        raise app.UsageError(f"{config.get('task', 'toy')!r} configs have no text to sample: use an LM config")
    use_qrs = _QRS_ACCEPTANCE.value is not None or _QRS_LOG_BETA.value is not None
    if use_qrs:
        if (_QRS_ACCEPTANCE.value is None) == (_QRS_LOG_BETA.value is None):
            raise app.UsageError("give one of --qrs_acceptance and --qrs_log_beta, not both")
        if _QRS_ACCEPTANCE.value is not None and not 0.0 < _QRS_ACCEPTANCE.value <= 1.0:
            raise app.UsageError(f"--qrs_acceptance={_QRS_ACCEPTANCE.value} must be in (0, 1]")
        for flag in (_QRS_PILOT, _QRS_BATCH, _QRS_MAX_DRAWS):
            if flag.value < 1:
                raise app.UsageError(f"--{flag.name}={flag.value} must be >= 1")
    if not _BASE.value:  # before loading the model: a wrong workdir fails at once
        try:
            checkpoint.require_checkpoint(config.workdir, _STEP.value)
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(f"{e} (or pass --base to sample the base model only)")
    prompts = list(_PROMPT.value)
    if not prompts:
        prompts = train.load_config_prompts(config, limit=_NUM_PROMPTS.value)
    if use_qrs:
        records, summaries = qrs_run(config, prompts, _NUM_SAMPLES.value, _STEP.value, _BASE.value, _SEED.value,
                                     acceptance=_QRS_ACCEPTANCE.value, log_beta=_QRS_LOG_BETA.value,
                                     pilot=_QRS_PILOT.value, batch=_QRS_BATCH.value,
                                     max_draws=_QRS_MAX_DRAWS.value)
        print(format_records(records) if records else "\nno draw was kept")
        print(format_qrs(summaries))
    else:
        records = sample_run(config, prompts, _NUM_SAMPLES.value, _STEP.value, _BASE.value, _SEED.value)
        print(format_records(records))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    common.run(main)
