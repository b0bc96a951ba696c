import numpy as np
import pytest

from configs import toy as toy_config
from fdrl import toy_train

ALL_F = ["fkl", "rkl", "js", "tv", "chi2_pearson", "chi2_neyman", "hellinger", "alpha=0.5"]


def short_config(**overrides):
    config = toy_config.get_config()
    config.update(dict(steps=100, eval_every=50, num_seeds=1, target="rlhf"))
    config.update(overrides)
    return config


@pytest.mark.parametrize("f", ALL_F)
def test_training_lowers_the_exact_target_divergence(f):
    history = toy_train.run_seeds(short_config(f=f))
    start, end = float(history["objective"][0, 0]), float(history["objective"][0, -1])
    assert end < 0.5 * start, (f, start, end)


@pytest.mark.parametrize("overrides", [
    dict(proposal="lagged", proposal_every=5, f="fkl"),
    dict(baseline="loo"), dict(baseline="ema"), dict(baseline="window"), dict(baseline="none", f="tv"),
    dict(family="shared", target="pointwise", f="rkl"),
    dict(target="distributional", f="fkl"),
    dict(lr_schedule="cosine", warmup_steps=10, f="js"),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_variants_learn(overrides):
    history = toy_train.run_seeds(short_config(**overrides))
    start, end = float(history["kl_p_pi"][0, 0]), float(history["kl_p_pi"][0, -1])
    assert end < 0.8 * start, (overrides, start, end)


def test_same_seed_same_result_and_seeds_differ():
    config = short_config(num_seeds=2, steps=20, eval_every=10)
    a, b = toy_train.run_seeds(config), toy_train.run_seeds(config)
    np.testing.assert_array_equal(a["kl_p_pi"], b["kl_p_pi"])
    assert not np.allclose(a["kl_p_pi"][0, -1], a["kl_p_pi"][1, -1])


def test_log_z_estimate_converges_to_exact():
    config = short_config()
    problem, target = toy_train.make_task(config)
    history = toy_train.run_seeds(config, problem, target)
    assert abs(float(history["log_Z_estimate"][0, -1]) - float(target.log_Z)) < 0.05


@pytest.mark.parametrize("field, value, match", [
    ("f", "kl", "unknown f-divergence"), ("family", "mlp", "unknown family"), ("baseline", "x", "unknown baseline"),
    ("proposal", "x", "unknown proposal"), ("steps", 101, "multiple of eval_every"), ("beta", 0.0, "beta=0.0 must be a finite number > 0"),
    ("learning_rate", -1.0, "learning_rate=-1.0 must be a finite number > 0"),
])
def test_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        toy_train.run_seeds(short_config(**{field: value}))


@pytest.mark.parametrize("overrides", [
    dict(algo="ppo", f="rkl"), dict(algo="fppo", f="js"),
    dict(algo="fppo", f="fkl", use_critic=False, whiten_advantages=True),  # no critic: whitening is the baseline
    dict(algo="ppo", f="rkl", kl_controller="adaptive", whiten_advantages=True, ppo_aggregation="token_mean"),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_ppo_runs_lower_the_exact_divergence(overrides):
    history = toy_train.run_seeds(short_config(**overrides))
    # The divergence each run minimises: KL(π‖p) for PPO-RLHF, D_f for f-PPO.
    start, end = float(history["objective"][0, 0]), float(history["objective"][0, -1])
    assert end < 0.5 * start, (overrides, start, end)


def test_ppo_config_errors():
    with pytest.raises(ValueError, match="unknown algo='trpo'"):
        toy_train.run_seeds(short_config(algo="trpo"))
    with pytest.raises(ValueError, match="divisible by ppo_minibatches"):
        toy_train.run_seeds(short_config(algo="ppo", ppo_minibatches=5))


@pytest.mark.parametrize("variant", ["", "smoke"])
def test_the_sweep_configs_validate(variant):
    for overrides in toy_config.get_sweep(variant):
        config = toy_config.get_config(variant)
        config.update({k: v for k, v in overrides.items() if k != "label"})
        toy_train.validate(config)


BAD_TOY_FIELDS = [
    ("ppo_minibatches", 0, dict(algo="ppo"), "ppo_minibatches=0 must be an integer >= 1"),
    ("ppo_epochs", 0, dict(algo="fppo"), "ppo_epochs=0 must be an integer >= 1"),
    ("clip_eps", 0.0, dict(algo="fppo"), r"clip_eps=0.0 must be a finite number in \(0, 1\)"),
    ("gamma", 2.0, dict(algo="ppo"), "gamma=2.0 must be"),
    ("gae_lambda", 1.5, dict(algo="ppo"), "gae_lambda=1.5 must be"),
    ("ppo_aggregation", "mean", dict(algo="ppo"), "unknown ppo_aggregation='mean'"),
    ("critic_learning_rate", 0.0, dict(algo="ppo"), "critic_learning_rate=0.0 must be a finite number > 0"),
    ("value_clip", -1.0, dict(algo="ppo"), "value_clip=-1.0 must be"),
    ("kl_controller", "pid", dict(algo="ppo"), "unknown kl_controller='pid'"),
    ("kl_target", 0.0, dict(algo="ppo"), "kl_target=0.0 must be"),
    ("kl_gain", -1.0, dict(algo="ppo"), "kl_gain=-1.0 must be"),
    ("vocab_size", 1, {}, "vocab_size=1 must be an integer >= 2"),
    ("seq_len", 0, {}, "seq_len=0 must be an integer >= 1"),
    ("target", "reward", {}, "unknown target='reward'"),
    ("mu_bar", 1.0, dict(target="distributional"), r"mu_bar=1.0 must be a finite number in \(0, 1\)"),
    ("max_abs_u", -1.0, {}, "max_abs_u=-1.0 must be a finite number > 0"),
    ("baseline_decay", -0.5, dict(baseline="ema"), "baseline_decay=-0.5 must be"),
    ("baseline_window", 0, dict(baseline="window"), "baseline_window=0 must be an integer >= 1"),
    ("proposal_every", 0, dict(proposal="lagged"), "proposal_every=0 must be an integer >= 1"),
    ("grad_clip", -1.0, {}, "grad_clip=-1.0 must be"),
    ("eval_every", 0, {}, "eval_every=0 must be an integer >= 1"),  # was a ZeroDivisionError
    ("num_seeds", 0, {}, "num_seeds=0 must be an integer >= 1"),
]


@pytest.mark.parametrize("field, value, base, match", BAD_TOY_FIELDS, ids=[f"{b[0]}={b[1]}" for b in BAD_TOY_FIELDS])
def test_bad_toy_fields_are_named(field, value, base, match):
    with pytest.raises(ValueError, match=match):
        toy_train.run_seeds(short_config(**base, **{field: value}))
