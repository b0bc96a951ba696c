"""Helpers shared by the experiment entry points: config files and result tables."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python experiments/x.py` from anywhere
    sys.path.insert(0, ROOT)


def run(main) -> None:
    """absl's app.run(main), with the libraries' INFO logs off unless `--verbosity`/`-v` is
    given: orbax's checkpoint-manager settings, tfds' dataset preparation and JAX's backend
    probing otherwise bury the samples and the progress bar. Warnings and errors still show."""

    def quiet_main(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        return main(argv)

    app.run(quiet_main)


def config_module(flag_name: str = "config"):
    """The module of the config file given to a config_flags flag, and its ':arg'."""
    path, _, arg = config_flags.get_config_filename(flags.FLAGS[flag_name]).partition(":")
    spec = importlib.util.spec_from_file_location("_fdrl_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, arg


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fixed(x: float, digits: int = 4) -> str:
    """`x` to `digits` decimals, without the minus of a value that rounds to zero: a Monte
    Carlo estimate such as KL(π‖a) at step 0 is -1e-7, not a negative divergence."""
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def speedup_verdict(ratios: dict, target: float) -> str:
    """"met" or "not met" for `ratios` {label: unrounded ratio}, each shown to three decimals:
    a ratio of 1.4954 prints as 1.50× in a two-decimal table but misses a 1.5× target."""
    shown = ", ".join(f"{label} {ratio:.3f}×" for label, ratio in ratios.items())
    return f"{'met' if all(r >= target for r in ratios.values()) else 'not met'} ({shown})"


def heap_note(environ=os.environ) -> str:
    """A sentence naming the C heap's tunables when the run set any (GLIBC_TUNABLES, e.g.
    glibc.malloc.hugetlb=1: 2 MiB pages for XLA's buffers), so that a report taken with
    them is not read as a default run; "" otherwise."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return f" C heap: GLIBC_TUNABLES={tunables} (not a default)." if tunables else ""


def save_figure(fig, path: str) -> None:
    """Lays out, writes (90 dpi) and closes a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(out_dir: str, name: str, report: str, data=None) -> None:
    """Prints a markdown report and writes it to <out_dir>/<name>.md (and `data` to <name>.json)."""
    print(report)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(report + "\n")
    if data is not None:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
