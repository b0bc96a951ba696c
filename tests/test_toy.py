import math

import jax
import numpy as np
import pytest

from fdrl import toy


@pytest.fixture(scope="module")
def problem():
    return toy.make_problem(vocab_size=3, seq_len=4, seed=1)


def test_base_is_a_distribution(problem):
    assert problem.sequences.shape == (81, 4)
    assert float(jax.nn.logsumexp(problem.base_logp)) == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_array_equal(toy.sequence_id(problem.sequences, 3), np.arange(81))


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_policy_starts_at_base_and_sampler_logp_matches(problem, family):
    params = toy.init_policy(problem, family)
    np.testing.assert_allclose(toy.all_logp(problem, family, params), problem.base_logp, atol=1e-5)
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape), params)
    tokens, logp = toy.sample(problem, family, params, jax.random.PRNGKey(0), 512)
    np.testing.assert_allclose(logp, toy.sequence_logp(problem, family, params, tokens), atol=1e-5)


def test_sampler_frequencies_match_probabilities(problem):
    params = toy.init_policy(problem, "tabular")
    tokens, _ = jax.jit(lambda k: toy.sample(problem, "tabular", params, k, 200_000))(jax.random.PRNGKey(3))
    freq = np.bincount(np.asarray(toy.sequence_id(tokens, 3)), minlength=81) / 200_000
    tv = 0.5 * np.abs(freq - np.exp(np.asarray(problem.base_logp))).sum()
    assert tv < 0.02


def test_targets_and_exact_metrics(problem):
    for name in toy.TARGETS:
        target = toy.make_target(problem, name)
        assert float(jax.nn.logsumexp(target.log_p)) == pytest.approx(0.0, abs=1e-5)
        at_target = toy.exact_metrics(problem, target, target.log_p)
        for metric in ("kl_p_pi", "kl_pi_p", "js", "tv"):
            assert float(at_target[metric]) < 1e-5, (name, metric)
        at_base = toy.exact_metrics(problem, target, problem.base_logp)
        assert float(at_base["kl_pi_a"]) < 1e-6
        assert float(at_base["kl_p_pi"]) > 0.01
    hard = toy.pointwise_target(problem)
    assert float(toy.exact_metrics(problem, hard, problem.base_logp)["kl_pi_p"]) == math.inf
    soft = toy.pointwise_target(problem, log_floor=math.log(1e-3))
    assert math.isfinite(float(toy.exact_metrics(problem, soft, problem.base_logp)["kl_pi_p"]))


def test_bad_arguments(problem):
    with pytest.raises(ValueError, match="unknown policy family='mlp'"):
        toy.init_policy(problem, "mlp")
    with pytest.raises(ValueError, match="unknown toy target='reward'"):
        toy.make_target(problem, "reward")
    with pytest.raises(ValueError, match="too many to enumerate"):
        toy.make_problem(vocab_size=50, seq_len=8)
