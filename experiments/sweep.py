r"""Trains every entry of an LM config's `get_sweep()` and compares their final metrics.

  python experiments/sweep.py --config=configs/smollm2_sentiment.py:demo       # RLHF vs GDC on SmolLM2
  python experiments/sweep.py --config=configs/smollm2_gender.py:demo --seeds=3 --only=fkl,rkl
  python experiments/sweep.py --config=configs/smollm2_sentiment.py:smoke --config.steps=2

Any --config.<field> applies to every run; each entry's overrides (f, algo, ...) then
apply on top. Run e, seed s trains in <workdir>/sweep/<label of e>/seed<s> (fdrl.lm_sweep),
one after another in this process. Stopped (Ctrl-C, SIGTERM), the same command continues:
finished runs are read back, runs with checkpoints resume. Writes, by default to
<workdir>/sweep/summary (--prefix):

  <prefix>.md     final metrics per entry (mean ± std over seeds), the start (π = a), samples
  <prefix>.png    alignment, KL(π‖a), KL(p‖π), KL(π‖p) over training, a line per entry
  <prefix>.json   every run's evaluation history
"""

import json
import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags

import common  # puts the repo on sys.path
from fdrl import lm_sweep

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_sentiment.py:demo",
                                          "LM experiment config file[:variant] with a get_sweep().")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per entry: config.seed, config.seed + 1, ...")
_ONLY = flags.DEFINE_list("only", [], "Labels of the entries to run (default: all).")
_PREFIX = flags.DEFINE_string("prefix", "", "Path prefix of the summary files (default <workdir>/sweep/summary).")

LABELS = {"alignment": "alignment", "kl_p_pi": "KL(p‖π)", "kl_pi_p": "KL(π‖p)", "js": "JS(π,p)", "tv": "TV(π,p)",
          "kl_pi_a": "KL(π‖a)", "distinct_2": "distinct-2", "self_bleu": "self-BLEU"}
ALIGNMENT = {"pointwise": "E_π[b]", "rlhf": "E_π[r]", "distributional": "E_π[φ]"}
PLOT_METRICS = ("alignment", "kl_pi_a", "kl_p_pi", "kl_pi_p")


def _cell(mean_std, seeds: int) -> str:
    mean, std = mean_std
    if std is None:  # a non-finite mean (lm_sweep._mean_std)
        return f"{mean}"
    return common.fixed(mean) if seeds == 1 else f"{common.fixed(mean)} ± {common.fixed(std)}"


def write_table(config, summary: dict, results: list, path: str, seeds: int, title: str, command: str) -> None:
    alignment = ALIGNMENT.get(config.target.kind, "alignment")
    header = ["run"] + [alignment if m == "alignment" else LABELS[m] for m in lm_sweep.METRICS] + ["train s"]
    rows = [["(start: π = a)"] + [_cell(summary["start"][m], seeds) for m in lm_sweep.METRICS] + [""]]
    resumed = {r["label"] for r in results if r["resumed"]}
    for label, row in summary["runs"].items():
        seconds = f"{row['seconds'][0]:.0f}" + ("*" if label in resumed else "")
        rows.append([label] + [_cell(row[m], seeds) for m in lm_sweep.METRICS] + [seconds])
    steps = {row["steps"] for row in summary["runs"].values()}
    lines = [f"# Sweep of {title}: target={config.target.kind}, {'/'.join(map(str, sorted(steps)))} steps × "
             f"batch {config.batch_size}, {seeds} seed{'s' if seeds > 1 else ''} per run", "",
             f"Command: `{command}`", "",
             f"Final evaluation of each run{', mean ± std over seeds' if seeds > 1 else ''}: importance-sampling "
             f"estimates from "
             f"{config.eval_batch_size} fresh samples of π (fdrl/metrics.py names each estimator); "
             f"{alignment} is the target's score. Train s: seconds of training (* resumed: the last part's only).", "",
             common.markdown_table(header, rows), ""]
    for label in summary["runs"]:
        samples = next(r["samples"] for r in results if r["label"] == label)
        lines += [f"Samples after training, {label} (seed {config.seed}):", ""] + [f"- {s}" for s in samples] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(results: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(4 * len(PLOT_METRICS), 3))
    labels = list(dict.fromkeys(r["label"] for r in results))
    for ax, metric in zip(axes, PLOT_METRICS):
        for label in labels:
            runs = [r["history"] for r in results if r["label"] == label]
            length = min(len(h) for h in runs)  # seeds evaluate at the same steps
            values = np.array([[e[metric] for e in h[:length]] for h in runs], np.float64)
            steps = [e["step"] for e in runs[0][:length]]
            mean = values.mean(0)
            ax.plot(steps, mean, marker="o", label=label)
            if len(runs) > 1 and np.all(np.isfinite(values)):
                std = values.std(0)
                ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(LABELS[metric], fontsize=9)
        ax.set_xlabel("step")
    axes[-1].legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv):
    del argv
    config = _CONFIG.value
    if config.get("task") != "lm":
        raise ValueError(f"{config.get('task')!r} config: experiments/sweep.py runs LM configs "
                         "(configs/smollm2_*.py); the toy comparison is experiments/compare.py")
    module, arg = common.config_module()
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{module.__file__} has no get_sweep(): a sweep needs one (configs/smollm2_*.py have it)")
    runs = lm_sweep.plan(config, module.get_sweep(arg), seeds=_SEEDS.value, only=_ONLY.value)
    results = lm_sweep.run(runs)
    summary = lm_sweep.summarise(results)
    prefix = _PREFIX.value or os.path.join(config.workdir, "sweep", "summary")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    title = os.path.relpath(module.__file__, common.ROOT) + (f":{arg}" if arg else "")
    command = " ".join(["python", "experiments/sweep.py"] + [shlex.quote(a) for a in sys.argv[1:]])
    write_table(config, summary, results, prefix + ".md", _SEEDS.value, title, command)
    write_plot(results, prefix + ".png")
    with open(prefix + ".json", "w") as f:
        json.dump({"config": config.to_dict(), "summary": summary, "runs": results}, f)
    print(open(prefix + ".md").read())
    print(f"wrote {prefix}.md, {prefix}.png, {prefix}.json")


if __name__ == "__main__":
    common.run(main)
