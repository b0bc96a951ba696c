r"""The RLHF-vs-GDC comparison on the exact toy problem.

  python experiments/compare.py --config=configs/toy.py
  python experiments/compare.py --config=configs/toy.py:smoke --config.num_seeds=2

Runs every entry of the config file's `get_sweep()` (f over fkl, rkl, js, tv and
an α grid, for each toy target and policy family) with `num_seeds` seeds and
writes to <workdir>:

  toy_compare.md    final exact metrics, mean ± std over seeds (committed)
  toy_compare.png   exact divergences to the target over training (committed)
  toy_compare.json  every metric history (for colabs/03; not committed)
"""

import json
import os
import time

from absl import flags
from ml_collections import config_flags

import common
from fdrl import toy_train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy.py", "Experiment config file[:variant].")
_PREFIX = flags.DEFINE_string("prefix", "toy_compare", "File name prefix of the outputs in workdir.")

TABLE_METRICS = ("kl_p_pi", "kl_pi_p", "js", "tv", "alignment", "kl_pi_a", "entropy")
PLOT_METRICS = ("kl_p_pi", "kl_pi_p", "js", "tv")
LABELS = {"kl_p_pi": "KL(p‖π)", "kl_pi_p": "KL(π‖p)", "js": "JS(π,p)", "tv": "TV(π,p)",
          "alignment": "E_π[score]", "kl_pi_a": "KL(π‖a)", "entropy": "H(π)"}
ALIGNMENT = {"pointwise": "E_π[b]", "rlhf": "E_π[r]", "distributional": "E_π[φ]"}


def run_label(overrides: dict) -> str:
    return overrides.get("label", overrides["f"])


def run_sweep(config, sweep):
    """Runs each override set; returns a list of (overrides, history)."""
    results = []
    for i, overrides in enumerate(sweep):
        run_config = config.copy_and_resolve_references()
        for k, v in overrides.items():
            if k != "label":
                run_config[k] = v
        start = time.time()
        history = toy_train.run_seeds(run_config)
        print(f"[{i + 1}/{len(sweep)}] {overrides} {time.time() - start:.1f}s "
              f"objective {float(history['objective'][:, 0].mean()):.4f} → {float(history['objective'][:, -1].mean()):.4f}",
              flush=True)
        results.append((overrides, history))
    return results


def write_table(config, results, path):
    groups = {}
    for overrides, history in results:
        groups.setdefault((overrides["target"], overrides["family"]), []).append((overrides, history))
    lines = [f"# Exact toy comparison: V={config.vocab_size}, L={config.seq_len}, {config.steps} steps × batch "
             f"{config.batch_size}, {config.num_seeds} seeds (mean ± std of the final exact metrics)", "",
             "Regenerate: `python experiments/compare.py --config=configs/toy.py`", ""]
    for (target, family), runs in groups.items():
        lines += [f"## target={target}, policy={family}", ""]
        header = ["f"] + [ALIGNMENT[target] if m == "alignment" else LABELS[m] for m in TABLE_METRICS]
        start = runs[0][1]
        rows = [["(start: π = a)"] + [toy_train.format_mean_std(float(start[m][:, 0].mean()), 0.0).split(" ±")[0]
                                      for m in TABLE_METRICS]]
        for overrides, history in runs:
            summary = toy_train.summarise(history)
            rows.append([run_label(overrides)] + [toy_train.format_mean_std(*summary[m]) for m in TABLE_METRICS])
        lines += [common.markdown_table(header, rows), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for overrides, history in results:
        groups.setdefault((overrides["target"], overrides["family"]), []).append((overrides, history))
    fig, axes = plt.subplots(len(groups), len(PLOT_METRICS), figsize=(4 * len(PLOT_METRICS), 2.8 * len(groups)),
                             squeeze=False)
    for row, ((target, family), runs) in enumerate(groups.items()):
        for col, metric in enumerate(PLOT_METRICS):
            ax = axes[row, col]
            for overrides, history in runs:
                mean, std = history[metric].mean(0), history[metric].std(0)
                ax.plot(history["step"], mean, label=run_label(overrides))
                ax.fill_between(history["step"], mean - std, mean + std, alpha=0.2)
            ax.set_yscale("log")
            ax.set_title(f"{target} / {family}: {LABELS[metric]}", fontsize=9)
            ax.set_xlabel("step")
    axes[0, -1].legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv):
    del argv
    config = _CONFIG.value
    module, arg = common.config_module()
    sweep = module.get_sweep(arg)
    results = run_sweep(config, sweep)
    os.makedirs(config.workdir, exist_ok=True)
    base = os.path.join(config.workdir, _PREFIX.value)
    write_table(config, results, base + ".md")
    write_plot(results, base + ".png")
    with open(base + ".json", "w") as f:
        json.dump({"config": config.to_dict(),
                   "runs": [{"overrides": o, "history": {k: v.tolist() for k, v in h.items()
                                                         if k != toy_train.FINAL_POLICY}} for o, h in results]}, f)
    print(open(base + ".md").read())
    print(f"wrote {base}.md, {base}.png, {base}.json")


if __name__ == "__main__":
    common.run(main)
