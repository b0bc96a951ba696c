"""Sweeps of LM runs (fdrl/lm_sweep.py): planning checks every run before any trains; a
stopped sweep continues (finished runs read back, checkpointed ones resumed) and refuses a
folder of another config; summaries stay finite-or-inf, never NaN from an inf."""

import json
import math
import os
from typing import NamedTuple

import numpy as np
import pytest

from configs import smollm2_gender, smollm2_sentiment, smollm2_word
from fdrl import lm_sweep


def _config(tmp_path, **fields):
    config = smollm2_sentiment.get_config("smoke")
    config.workdir = str(tmp_path)
    for k, v in fields.items():
        config[k] = v
    return config


def test_plan_names_folders_applies_overrides_and_seeds(tmp_path):
    config = _config(tmp_path, seed=3)
    sweep = [dict(f="js"), dict(f="rkl", **{"target.beta": 0.5}), dict(algo="ppo", f="rkl", label="ppo rlhf")]
    runs = lm_sweep.plan(config, sweep, seeds=2)
    assert [(r.label, r.seed) for r in runs] == [("js", 3), ("js", 4), ("f=rkl target.beta=0.5", 3),
                                               ("f=rkl target.beta=0.5", 4), ("ppo rlhf", 3), ("ppo rlhf", 4)]
    assert runs[0].config.workdir == os.path.join(str(tmp_path), "sweep", "js", "seed3")
    assert runs[5].config.workdir == os.path.join(str(tmp_path), "sweep", "ppo_rlhf", "seed4")
    assert runs[2].config.target.beta == 0.5 and runs[0].config.target.beta == config.target.beta
    assert runs[4].config.algo == "ppo" and runs[1].config.seed == 4
    assert config.seed == 3 and config.f == "rkl" and config.workdir == str(tmp_path)  # the base is untouched
    assert [r.label for r in lm_sweep.plan(config, sweep, only=["js"])] == ["js"]


@pytest.mark.parametrize("sweep,kwargs,message", [
    ([dict(f="kl")], {}, "sweep entry 'kl': unknown f"),
    ([dict(f="js", beta=1.0)], {}, "no field 'beta'"),
    ([dict(f="js", **{"target.nope": 1})], {}, "no field 'target.nope'"),
    ([dict(f="js", **{"nope.beta": 1})], {}, "no field 'nope'"),
    ([dict(f="js"), dict(f="js")], {}, "repeated: \\['js'\\]"),
    ([dict(f="js")], dict(only=["fkl"]), "only=\\['fkl'\\] not in the sweep; its labels are \\['js'\\]"),
    ([dict(f="js")], dict(seeds=0), "seeds=0 must be an integer >= 1"),
    ([dict(f="js", label="js,lr")], {}, "labels \\['js,lr'\\] hold commas"),
    ([], {}, "the sweep is empty"),
    ([dict(f="js", batch_size=3, microbatch_size=2)], {}, "microbatch_size=2 must be 0"),
])
def test_plan_rejects_a_bad_entry_before_anything_trains(tmp_path, sweep, kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        lm_sweep.plan(_config(tmp_path), sweep, **kwargs)


@pytest.mark.parametrize("module", [smollm2_sentiment, smollm2_word, smollm2_gender])
@pytest.mark.parametrize("variant", ["", "demo", "smoke"])
def test_every_shipped_sweep_plans(module, variant, tmp_path):
    config = module.get_config(variant)
    config.workdir = str(tmp_path)
    runs = lm_sweep.plan(config, module.get_sweep(variant))
    fs = {r.config.f for r in runs}
    assert {"fkl", "rkl", "js", "tv"} <= fs  # forward KL (GDC) to reverse KL (RLHF)
    assert not os.listdir(tmp_path)  # planning writes nothing


def _fake_train(calls, steps_logged=(0, 2)):
    """Stands in for train.train_and_evaluate: logs eval records as the loop would."""
    def train(config, log=print):
        calls.append((config.workdir, config.f, config.resume))
        os.makedirs(config.workdir, exist_ok=True)
        with open(os.path.join(config.workdir, "metrics.jsonl"), "a" if config.resume else "w") as f:
            for step in steps_logged:
                value = 1.0 + step + (config.seed - 3) + (0.5 if config.f == "fkl" else 0.0)
                f.write(json.dumps(dict(step=step, kind="train", loss=0.0)) + "\n")
                f.write(json.dumps(dict(step=step, kind="eval", samples=[f"s{step}"],
                                        **{m: value for m in lm_sweep.METRICS})) + "\n")
        return dict(seconds=7.0, history=[], samples=[], state=None)
    return train


def test_run_reads_finished_runs_back_and_refuses_another_config(tmp_path, monkeypatch):
    config = _config(tmp_path, seed=3)
    runs = lm_sweep.plan(config, [dict(f="js"), dict(f="fkl")], seeds=2)
    calls, clears = [], []
    # After each trained run its compiled programs go (a sweep's peak grew run by run).
    monkeypatch.setattr(lm_sweep.jax, "clear_caches", lambda: clears.append(len(calls)))
    results = lm_sweep.run(runs, log=lambda *a: None, train_fn=_fake_train(calls))
    assert [c[1:] for c in calls] == [("js", False)] * 2 + [("fkl", False)] * 2
    assert clears == [1, 2, 3, 4]
    assert [r["history"][-1]["alignment"] for r in results] == [3.0, 4.0, 3.5, 4.5]
    assert results[0]["samples"] == ["s2"] and results[0]["seconds"] == 7.0 and not results[0]["resumed"]

    again = lm_sweep.run(runs, log=lambda *a: None, train_fn=_fake_train(calls))
    assert len(calls) == 4 and again == results  # nothing trained twice
    assert clears == [1, 2, 3, 4]  # nor cleared after a run read back

    summary = lm_sweep.summarise(results)
    assert summary["runs"]["js"]["alignment"] == (3.5, 0.5) and summary["runs"]["fkl"]["kl_pi_a"] == (4.0, 0.5)
    assert summary["runs"]["js"]["seeds"] == 2 and summary["runs"]["js"]["steps"] == 2
    assert summary["start"]["js"] == (1.5, 0.5)  # the first entry's step-0 evaluations

    changed = _config(tmp_path, seed=3, learning_rate=0.5)
    with pytest.raises(ValueError, match="another config \\(learning_rate=0.001 there, 0.5 now\\)"):
        lm_sweep.run(lm_sweep.plan(changed, [dict(f="js")]), log=lambda *a: None, train_fn=_fake_train(calls))
    # Launch fields are not part of a run's identity.
    relaunch = _config(tmp_path, seed=3, progress_bar=True)
    assert lm_sweep.run(lm_sweep.plan(relaunch, [dict(f="js")]), log=lambda *a: None,
                        train_fn=_fake_train(calls)) == results[:1]


class _State(NamedTuple):
    step: np.ndarray


def test_run_resumes_a_checkpointed_run_and_restarts_an_unsaved_one(tmp_path):
    from fdrl import checkpoint

    config = _config(tmp_path)
    (js,) = lm_sweep.plan(config, [dict(f="js")])
    (fkl,) = lm_sweep.plan(config, [dict(f="fkl")])
    calls = []

    def stopped(config, log=print):  # a run stopped by SIGTERM after saving step 2
        _fake_train(calls, steps_logged=(0, 2))(config, log)
        if config.f == "js":
            checkpoint.save_checkpoint(checkpoint.checkpoint_manager(config.workdir), _State(np.int32(2)))
        raise SystemExit("SIGTERM: stopped after step 2")

    with pytest.raises(SystemExit):
        lm_sweep.run([js], log=lambda *a: None, train_fn=stopped)
    with pytest.raises(SystemExit):
        lm_sweep.run([fkl], log=lambda *a: None, train_fn=stopped)
    results = lm_sweep.run([js, fkl], log=lambda *a: None, train_fn=_fake_train(calls, steps_logged=(2, 4)))
    assert [c[1:] for c in calls[2:]] == [("js", True), ("fkl", False)]
    # The resumed run's log continues the stopped one's; step 2, logged twice, keeps its last record.
    assert [e["step"] for e in results[0]["history"]] == [0, 2, 4] and results[0]["resumed"]
    assert [e["step"] for e in results[1]["history"]] == [2, 4] and not results[1]["resumed"]

    # Checkpoints that no sweep made are someone else's run.
    (other,) = lm_sweep.plan(_config(tmp_path / "other"), [dict(f="js")])
    checkpoint.save_checkpoint(checkpoint.checkpoint_manager(other.config.workdir), _State(np.int32(1)))
    with pytest.raises(FileExistsError, match="holds checkpoints but no sweep_run.json"):
        lm_sweep.run([other], log=lambda *a: None, train_fn=_fake_train(calls))


@pytest.mark.parametrize("values,expected", [
    ([1.0, 3.0], (2.0, 1.0)),
    ([1.0, math.inf], (math.inf, None)),
    ([-math.inf, 2.0], (-math.inf, None)),
    ([math.inf, -math.inf], (math.nan, None)),
    ([math.nan, 1.0], (math.nan, None)),
    ([1e308, 1e308], (1e308, 0.0)),
])
def test_mean_std_of_extremes(values, expected):
    mean, std = lm_sweep._mean_std(values)
    assert (mean == expected[0] or (math.isnan(mean) and math.isnan(expected[0]))) and std == expected[1]


def test_eval_history_keeps_the_last_record_of_a_step(tmp_path):
    lines = [dict(step=0, kind="eval", a=1.0), dict(step=1, kind="train", a=9.0), dict(step=2, kind="eval", a=2.0),
             dict(step=2, kind="eval", a=3.0), dict(step=1, kind="eval", a=4.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert lm_sweep.eval_history(str(tmp_path)) == [dict(step=0, a=1.0), dict(step=1, a=4.0), dict(step=2, a=3.0)]
