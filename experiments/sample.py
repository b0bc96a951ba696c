r"""Samples from a trained policy (a run's checkpoint) beside the base model, prompt by prompt.

  python experiments/sample.py --config=configs/smollm2_sentiment.py --prompt="Describe your morning."
  python experiments/sample.py --config=configs/smollm2_word.py --config.workdir=runs/a --step=50 \
      --prompt="Write a review." --prompt="Tell me a story." --num_samples=4
  python experiments/sample.py --config=configs/smollm2_sentiment.py --base       # the base model a only

The config is the run's (same file, variant and flags: the model, the target and the
workdir); sampling follows its temperature and top-p (`--config.temperature=0.7`).
Without --prompt the first --num_prompts of the config's prompt set are used. Each
completion is printed with its score under the target's scorer and its log-probability
under the policy and under a (log π − log a: how much more likely training made it);
--out writes the records as JSON lines.
"""

import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common  # noqa: F401  (puts the repo on sys.path)
from fdrl import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file[:variant].")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A user prompt (repeat the flag for several).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 3, "Without --prompt: this many of the config's prompts.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "Completions per prompt, from each model.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint's step (default: the latest in --config.workdir).")
_BASE = flags.DEFINE_bool("base", False, "Sample the base model a only; no checkpoint needed.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "Write the records here as JSON lines.")


def sample_run(config, prompts, num_samples: int, step=None, base_only: bool = False, seed: int = 0) -> list[dict]:
    """Records of Trainer.generate for the base model a and (unless base_only) the policy of
    config.workdir's checkpoint at `step` (latest by default), each with "model" and "step"."""
    trainer = train.Trainer(config)
    key = jax.random.PRNGKey(seed)
    models = [("base", 0, trainer.task.ref_params)]
    if not base_only:
        state = train.restore_run(trainer, step=step, params_only=True)
        models.append(("policy", int(state.step), state.params))
    records = []
    for i, (name, at, params) in enumerate(models):
        for r in trainer.generate(params, prompts, jax.random.fold_in(key, i), num_samples):
            records.append(dict(model=name, step=at, **r))
    return records


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
    prompts = list(_PROMPT.value)
    if not prompts:
        from fdrl import data
        prompts = data.load_prompts(config.prompts, limit=_NUM_PROMPTS.value)
    records = sample_run(config, prompts, _NUM_SAMPLES.value, _STEP.value, _BASE.value, _SEED.value)
    print(format_records(records))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
