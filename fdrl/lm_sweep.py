"""Sweeps of LM runs: each entry of a config file's `get_sweep()` (× seeds) trained in its
own workdir, one after another, and their evaluation histories gathered for a comparison.

    runs = lm_sweep.plan(config, module.get_sweep(), seeds=3)  # every run checked first
    results = lm_sweep.run(runs)                                # trains what is not done
    table = lm_sweep.summarise(results)                         # final metrics, mean ± std

Run r of entry e lives in <config.workdir>/sweep/<label of e>/seed<seed>. A sweep can be
stopped (Ctrl-C or a scheduler's SIGTERM between runs or, with checkpoints, within one) and
started again with the same command: finished runs are read back, a run with checkpoints
resumes, the rest start. Each run records its config (`RUN_FILE`) when it starts, so a
folder trained under another config is an error, not a silent mix.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import re
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from fdrl import checkpoint, lm_task

RUN_FILE = "sweep_run.json"
# The metrics a run's or a sweep's table reports (experiments/train.py, sweep.py), as
# Trainer.evaluate names them.
METRICS = ("alignment", "kl_p_pi", "kl_pi_p", "js", "tv", "kl_pi_a", "distinct_2", "self_bleu")
# Config fields that change how a run is launched, not what it computes.
_LAUNCH_FIELDS = ("resume", "progress_bar", "save_on_signal")


@dataclasses.dataclass(frozen=True)
class Run:
    label: str  # the sweep entry's "label", else its overrides ("f=js")
    seed: int
    config: object  # the run's whole ml_collections config, its workdir included


def run_label(overrides: dict) -> str:
    """An entry's name in tables and folders: its "label", else its f where that is all it
    sets ("js"), else "k=v k=v" of its overrides (no commas: --only takes a comma list)."""
    if "label" in overrides:
        return str(overrides["label"])
    if set(overrides) == {"f"}:
        return str(overrides["f"])
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def _folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", label) or "_"


def _set_field(config, path: str, value) -> None:
    """config.<path> = value for a dotted path ("target.beta"), naming an unknown field."""
    *parents, name = path.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            raise KeyError(f"sweep override {path}={value!r}: the config has no field {'.'.join(parents[:i + 1])!r}")
        node = node[part]
    if name not in node:
        raise KeyError(f"sweep override {path}={value!r}: the config has no field {path!r}")
    node[name] = value


def plan(config, sweep: Sequence[dict], seeds: int = 1, only: Sequence[str] = ()) -> list[Run]:
    """The runs of `sweep` (a list of override dicts, each with an optional "label") for
    seeds config.seed, config.seed + 1, ...; `only` keeps the entries of those labels.
    Every run's config is validated here, so a bad entry fails before the first run trains."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r} must be an integer >= 1")
    labels = [run_label(o) for o in sweep]
    with_commas = [label for label in labels if "," in label]
    if with_commas:
        raise ValueError(f"sweep labels {with_commas} hold commas, which --only=a,b splits: rename them")
    if not labels:
        raise ValueError("the sweep is empty: get_sweep() returned no entries")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"sweep labels must differ (each names a folder); repeated: {repeated}")
    unknown = [label for label in only if label not in labels]
    if unknown:
        raise ValueError(f"only={unknown} not in the sweep; its labels are {labels}")
    runs = []
    for overrides, label in zip(sweep, labels):
        if only and label not in only:
            continue
        for seed in range(config.seed, config.seed + seeds):
            run_config = copy.deepcopy(config)
            for path, value in overrides.items():
                if path != "label":
                    _set_field(run_config, path, value)
            run_config.seed = seed
            run_config.workdir = os.path.join(config.workdir, "sweep", _folder_name(label), f"seed{seed}")
            try:
                lm_task.validate(run_config)
            except ValueError as e:
                raise ValueError(f"sweep entry {label!r}: {e}") from None
            runs.append(Run(label, seed, run_config))
    return runs


def _as_json(config) -> dict:
    """The config as JSON would read it back (tuples as lists), without the launch fields."""
    d = json.loads(json.dumps(config.to_dict()))
    return {k: v for k, v in d.items() if k not in _LAUNCH_FIELDS}


def _differences(saved, now, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now)):
            out += _differences(saved.get(k, "<absent>"), now.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if saved == now else [f"{prefix[:-1]}={saved!r} there, {now!r} now"]


def _read_record(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, RUN_FILE)
    return json.load(open(path)) if os.path.exists(path) else None


def _write_record(workdir: str, record: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RUN_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)  # a stop while writing leaves the previous record


def eval_history(workdir: str) -> list[dict]:
    """The eval records of <workdir>/metrics.jsonl by step (a step logged twice, by a run
    stopped and resumed, keeps its last record)."""
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "eval":
                by_step[record["step"]] = {k: v for k, v in record.items() if k != "kind"}
    return [by_step[s] for s in sorted(by_step)]


def run(runs: Sequence[Run], log: Callable = print, train_fn: Optional[Callable] = None) -> list[dict]:
    """Trains each run that is not finished, one after another, in this process; returns
    one result per run: {label, seed, workdir, seconds, resumed, history, samples}.
    `seconds` is the training time of the call that finished the run (`resumed`: it
    continued from a checkpoint, so earlier parts are not counted)."""
    if train_fn is None:
        from fdrl import train  # the loop (and JAX's compile caches) only when something trains
        train_fn = train.train_and_evaluate
    results = []
    for i, r in enumerate(runs):
        workdir, config_json = r.config.workdir, _as_json(r.config)
        head = f"[{i + 1}/{len(runs)}] {r.label} seed {r.seed}"
        record = _read_record(workdir)
        steps = checkpoint.saved_steps(workdir)
        if record is None and steps:
            raise FileExistsError(f"{workdir} holds checkpoints but no {RUN_FILE}: it is not this sweep's run; "
                                  "remove it or choose another --config.workdir")
        if record is not None:
            changed = _differences(record["config"], config_json)
            if changed:
                raise ValueError(f"{workdir} holds a sweep run of another config ({'; '.join(changed[:4])}): "
                                 "run the sweep with that config, or choose another --config.workdir")
        if record is not None and record.get("finished"):
            log(f"{head}: finished earlier, read from {workdir}")
            results.append(record["result"])
            continue
        log(f"{head}: {f'resuming from step {steps[-1]}' if steps else 'training'} in {workdir}")
        _write_record(workdir, dict(config=config_json, finished=False))
        run_config = copy.deepcopy(r.config)
        run_config.resume = bool(steps)
        try:
            out = train_fn(run_config, log=log)
        except (KeyboardInterrupt, SystemExit):
            log(f"{head}: stopped; the same sweep command continues it (from its last checkpoint, if it saved one)")
            raise
        seconds = float(out["seconds"])
        # The trainer and its state, and the run's compiled programs, freed before the next
        # run loads its model: jit's caches keep executables (~0.1 GB each on SmolLM2) after
        # the run's functions are gone, and the next run compiles its own anyway.
        del out
        gc.collect()
        jax.clear_caches()
        history = eval_history(workdir)
        if not history:
            raise RuntimeError(f"the run in {workdir} logged no evaluation to metrics.jsonl")
        result = dict(label=r.label, seed=r.seed, workdir=workdir, seconds=seconds, resumed=bool(steps),
                      history=history, samples=history[-1].get("samples", []))
        _write_record(workdir, dict(config=config_json, finished=True, result=result))
        log(f"{head}: {seconds:.0f}s, " + ", ".join(f"{k} {history[-1][k]:.4g}" for k in ("alignment", "kl_pi_a")
                                                    if k in history[-1]))
        results.append(result)
    return results


def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and (population) std. Where a value is ±inf (KL(π‖p) of a π that leaves p's
    support) the mean is that inf and the std None, not the NaN of inf − inf; infs of both
    signs, or a NaN, give NaN, shown as such."""
    values = np.asarray(values, np.float64)
    if np.all(np.isfinite(values)):
        scale = max(float(np.max(np.abs(values))), 1e-300)  # a sum of values near 1e308 would overflow
        return float(scale * np.mean(values / scale)), float(scale * np.std(values / scale))
    signs = set(np.sign(values[np.isinf(values)]).tolist())
    if np.any(np.isnan(values)) or len(signs) > 1:
        return math.nan, None
    return signs.pop() * math.inf, None


def summarise(results: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict:
    """{"start": {metric: (mean, std)}, "runs": {label: {metric: (mean, std), "seconds":
    (mean, std), "seeds": n}}}: the final evaluation of each run, over its seeds, and the
    step-0 evaluation (π = a) of the first entry's seeds."""
    by_label = {}
    for res in results:
        by_label.setdefault(res["label"], []).append(res)
    out = {"runs": {}}
    for label, group in by_label.items():
        row = {m: _mean_std([g["history"][-1][m] for g in group]) for m in metrics}
        row["seconds"] = _mean_std([g["seconds"] for g in group])
        row["seeds"] = len(group)
        row["steps"] = group[0]["history"][-1]["step"]
        out["runs"][label] = row
    first = next(iter(by_label.values()))
    out["start"] = {m: _mean_std([g["history"][0][m] for g in first]) for m in metrics}
    return out
