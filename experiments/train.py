r"""Trains one configuration and prints its final metrics.

  python experiments/train.py --config=configs/toy.py --config.f=js
  python experiments/train.py --config=configs/toy.py:smoke --config.target=rlhf --config.f=rkl
  python experiments/train.py --config=configs/smollm2_sentiment.py --config.mesh.shape="(1,-1,1)"   # FSDP

Multi-host (one process per host, same command on each):
  python experiments/train.py --config=... --distributed                      # TPU pod / SLURM: auto-detected
  python experiments/train.py --config=... --distributed --coordinator_address=host0:1234 \
      --num_processes=2 --process_id=0                                       # anything else

Writes the metric history to <workdir>/train_<target>_<family>_<f>.json.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

import common  # puts the repo on sys.path
from fdrl import toy_train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy.py", "Experiment config file[:variant].")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() before anything else "
                                 "(multi-host GPU/TPU). Without the three flags below it auto-detects the cluster "
                                 "(Cloud TPU, SLURM, Open MPI, Kubernetes).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")


def initialize_distributed():
    """jax.distributed.initialize from the flags: every process then sees the devices of
    all hosts, the mesh spans them, and orbax writes checkpoints from all of them."""
    given = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                 process_id=_PROCESS_ID.value)
    if not _DISTRIBUTED.value:
        if any(v is not None for v in given.values()):
            raise ValueError("--coordinator_address/--num_processes/--process_id need --distributed")
        return
    import jax
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
          f"{jax.device_count()} in all", flush=True)


def main(argv):
    del argv
    initialize_distributed()
    config = _CONFIG.value
    task = config.get("task", "toy")
    if task == "lm":
        return lm_main(config)
    if task != "toy":
        raise ValueError(f"unknown task={task!r}; configs set task='toy' or 'lm'")
    history = toy_train.run_seeds(config)
    summary = toy_train.summarise(history)
    title = f"toy target={config.target} family={config.family} f={config.f}"
    if config.f == "alpha":
        title += f" alpha={config.alpha}"
    print(f"{title}: {config.num_seeds} seeds, {config.steps} steps of batch {config.batch_size}; "
          f"exact log Z = {float(toy_train.make_task(config)[1].log_Z):.4f}")
    print(common.markdown_table(["metric", "start", "final (mean ± std)"],
                                [[k, common.fixed(float(history[k][:, 0].mean())), toy_train.format_mean_std(*v)]
                                 for k, v in summary.items()]))
    os.makedirs(config.workdir, exist_ok=True)
    name = f"train_{config.target}_{config.family}_{config.f}".replace("=", "")
    path = os.path.join(config.workdir, name + ".json")
    with open(path, "w") as f:
        json.dump({"config": config.to_dict(), "history": {k: v.tolist() for k, v in history.items()
                                                           if k != toy_train.FINAL_POLICY}}, f)
    print(f"wrote {path}")


def lm_main(config):
    """f-DPG on SmolLM2 (or the tiny model): samples before/after, metric table, plot."""
    from fdrl import lm_sweep, train

    import jax

    out = train.train_and_evaluate(config)
    if jax.process_index() != 0:  # one process reports and writes the summary
        return
    history = out["history"]
    print("samples after training:\n  " + "\n  ".join(out["samples"]))
    first, last = history[0], history[-1]
    print(f"\nf={config.f}, target={config.target.kind}, {int(out['state'].step)} steps × batch {config.batch_size} "
          f"in {out['seconds']:.0f}s; estimates from {config.eval_batch_size} fresh samples of π")
    table = common.markdown_table(["metric", f"step {first['step']}", f"step {last['step']}"],
                                  [[k, common.fixed(first[k]), common.fixed(last[k])] for k in lm_sweep.METRICS])
    print(table)
    with open(os.path.join(config.workdir, "summary.md"), "w") as f:
        f.write(f"f={config.f}, target={config.target.kind}, {int(out['state'].step)} steps × batch "
                f"{config.batch_size}, {out['seconds']:.0f}s\n\n{table}\n\nSamples after training:\n\n"
                + "\n".join(f"- {s}" for s in out["samples"]) + "\n")
    path = os.path.join(config.workdir, "metrics.png")
    _plot_lm(history, path)
    print(f"wrote {path} and {os.path.join(config.workdir, 'metrics.jsonl')}")


def _plot_lm(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("alignment", "kl_p_pi", "kl_pi_p", "kl_pi_a")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    steps = [h["step"] for h in history]
    for ax, k in zip(axes, keys):
        ax.plot(steps, [h[k] for h in history], marker="o")
        ax.set_title(k)
        ax.set_xlabel("step")
    common.save_figure(fig, path)


if __name__ == "__main__":
    common.run(main)
