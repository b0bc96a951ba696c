r"""Trains one configuration and prints its final metrics.

  python experiments/train.py --config=configs/toy.py --config.f=js
  python experiments/train.py --config=configs/toy.py:smoke --config.target=rlhf --config.f=rkl

Writes the metric history to <workdir>/train_<target>_<family>_<f>.json.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

import common  # noqa: F401  (puts the repo on sys.path)
from fdrl import toy_train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy.py", "Experiment config file[:variant].")


def main(argv):
    del argv
    config = _CONFIG.value
    task = config.get("task", "toy")
    if task != "toy":
        raise ValueError(f"unknown task={task!r}")
    history = toy_train.run_seeds(config)
    summary = toy_train.summarise(history)
    title = f"toy target={config.target} family={config.family} f={config.f}"
    if config.f == "alpha":
        title += f" alpha={config.alpha}"
    print(f"{title}: {config.num_seeds} seeds, {config.steps} steps of batch {config.batch_size}; "
          f"exact log Z = {float(toy_train.make_task(config)[1].log_Z):.4f}")
    print(common.markdown_table(["metric", "start", "final (mean ± std)"],
                                [[k, f"{float(history[k][:, 0].mean()):.4f}", toy_train.format_mean_std(*v)]
                                 for k, v in summary.items()]))
    os.makedirs(config.workdir, exist_ok=True)
    name = f"train_{config.target}_{config.family}_{config.f}".replace("=", "")
    path = os.path.join(config.workdir, name + ".json")
    with open(path, "w") as f:
        json.dump({"config": config.to_dict(), "history": {k: v.tolist() for k, v in history.items()}}, f)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
