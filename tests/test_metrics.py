import math

import jax
import jax.numpy as jnp
import pytest

from fdrl import divergences, metrics, toy


def test_estimates_converge_to_exact_divergences():
    """On the toy problem: many samples from π give the exact KL, TV and JS."""
    problem = toy.make_problem(vocab_size=3, seq_len=4, seed=0)
    target = toy.rlhf_target(problem, beta=0.5)
    params = {"logits": problem.base_logits}
    tokens, logp = toy.sample(problem, "tabular", params, jax.random.PRNGKey(0), 200_000)
    ids = toy.sequence_id(tokens, 3)
    log_P = problem.base_logp[ids] + target.log_potential[ids]
    est = metrics.divergence_estimates(logp, log_P, target.log_Z, problem.base_logp[ids])
    exact = {n: float(divergences.exact_divergence(f, problem.base_logp, target.log_p))
             for n, f in [("kl_pi_p", "rkl"), ("kl_p_pi", "fkl"), ("tv", "tv"), ("js", "js")]}
    for name, value in exact.items():
        assert float(est[name]) == pytest.approx(value, rel=0.03, abs=2e-3), name
    assert abs(float(est["kl_pi_a"])) < 1e-5


def test_estimates_are_finite_at_extremes():
    logp = jnp.array([-5.0, -5.0, -5.0])
    est = metrics.divergence_estimates(logp, jnp.array([-jnp.inf, 1e4, -1e4]), jnp.array(0.0), logp)
    assert all(math.isfinite(float(v)) for v in est.values())
    est = metrics.divergence_estimates(logp, jnp.full((3,), -jnp.inf), jnp.array(-jnp.inf), logp)
    assert all(math.isfinite(float(v)) for v in est.values())


def test_diversity():
    assert metrics.distinct_n(["a b a b"], 1) == 0.5
    assert metrics.distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert metrics.self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)
    assert metrics.self_bleu(["one two three four", "five six seven eight"]) == 0.0


def test_shapes_that_would_broadcast_are_named():
    """A [B, 1] log_P against [B] log-probs would broadcast to [B, B] estimates without a word."""
    logp = jnp.zeros(4)
    with pytest.raises(ValueError, match=r"log_P has shape \(4, 1\) but policy_logp has shape \(4,\)"):
        metrics.divergence_estimates(logp, logp[:, None], jnp.array(0.0), logp)
    with pytest.raises(ValueError, match=r"ref_logp has shape \(3,\)"):
        metrics.divergence_estimates(logp, logp, jnp.array(0.0), logp[:3])
    with pytest.raises(ValueError, match=r"log_Z has shape \(2,\) .*log_Z may also be \[\]"):
        metrics.divergence_estimates(logp, logp, jnp.zeros(2), logp)
    with pytest.raises(ValueError, match="policy_logp must be per-sequence"):
        metrics.divergence_estimates(logp[None], logp[None], jnp.array(0.0), logp[None])
    per_context = metrics.divergence_estimates(logp, logp, jnp.zeros(4), logp)  # log Z_c gathered per sample
    assert all(jnp.shape(v) == () for v in per_context.values())
