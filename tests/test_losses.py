import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdrl import divergences, estimators, toy
from fdrl.losses import fdpg_loss

ALL_F = ["fkl", "rkl", "js", "tv", "chi2_pearson", "chi2_neyman", "hellinger", "alpha=0.5", "alpha=1.5", "alpha=-0.5"]
# f whose D_f(π‖p) is finite, with a finite gradient, when p has zeros (hard constraints).
HARD_OK_F = ["fkl", "js", "tv", "hellinger", "alpha=0.5"]


@functools.lru_cache(maxsize=None)
def small_problem():
    problem = toy.make_problem(vocab_size=3, seq_len=3, seed=3)
    # A policy away from a, so that π ≠ p ≠ a ≠ q.
    params = {"logits": problem.base_logits + 0.7 * jax.random.normal(jax.random.PRNGKey(5), problem.base_logits.shape)}
    proposal = {"logits": problem.base_logits + 0.5 * jax.random.normal(jax.random.PRNGKey(6), problem.base_logits.shape)}
    return problem, params, proposal


def expected_loss_gradient(f, problem, target, params, proposal_params, baseline):
    """E_{x~q}[∇ L] by enumeration: the whole support as the batch, weighted by q(x)."""
    log_P = problem.base_logp + target.log_potential
    if proposal_params is None:
        proposal_logp = None
        weight_fn = lambda p: jnp.exp(jax.lax.stop_gradient(toy.all_logp(problem, "tabular", p)))
    else:
        proposal_logp = toy.all_logp(problem, "tabular", proposal_params)
        weight_fn = lambda p: jnp.exp(proposal_logp)

    def loss(p):
        policy_logp = toy.all_logp(problem, "tabular", p)
        return fdpg_loss(f, policy_logp, log_P=log_P, proposal_logp=proposal_logp, log_Z=target.log_Z,
                         baseline=baseline, sample_weight=weight_fn(p))[0]

    return jax.grad(loss)(params)["logits"]


def exact_gradient(f, problem, target, params):
    return jax.grad(lambda p: divergences.exact_divergence(f, toy.all_logp(problem, "tabular", p), target.log_p))(params)["logits"]


@pytest.mark.parametrize("off_policy", [False, True], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("f", ALL_F)
def test_expected_fdpg_gradient_is_exact_divergence_gradient(f, off_policy):
    problem, params, proposal = small_problem()
    target = toy.rlhf_target(problem, beta=0.5)
    want = exact_gradient(f, problem, target, params)
    for baseline in (0.0, 0.37):  # any sample-independent baseline leaves the expectation unchanged
        got = expected_loss_gradient(f, problem, target, params, proposal if off_policy else None, baseline)
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 1e-3  # the check is not vacuous
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, scale), rtol=1e-4)


@pytest.mark.parametrize("f", HARD_OK_F)
def test_expected_gradient_with_hard_constraint(f):
    """log b = −inf on violating sequences (p = 0 there)."""
    problem, params, _ = small_problem()
    target = toy.pointwise_target(problem, min_count=1)
    assert bool(jnp.any(target.log_p == -jnp.inf))
    got = expected_loss_gradient(f, problem, target, params, None, 0.1)
    want = exact_gradient(f, problem, target, params)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_rkl_pseudo_reward_is_kl_penalised_reward():
    """With P = a·exp(r/β): R_rkl = r/β − (log π − log a) − (1 + log Z)."""
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    policy_logp = -10 + jax.random.normal(k1, (32,))
    ref_logp = -10 + jax.random.normal(k2, (32,))
    reward = jax.random.uniform(k3, (32,))
    beta = 0.3
    _, diag = fdpg_loss("rkl", policy_logp, ref_logp, reward / beta, baseline=0.0)
    kl_penalised = reward / beta - (policy_logp - ref_logp)
    offset = diag["pseudo_reward"] - kl_penalised
    np.testing.assert_allclose(offset, jnp.full_like(offset, -(1 + diag["log_Z"])), atol=1e-5)


@pytest.mark.parametrize("f", ALL_F)
def test_finite_at_extremes(f):
    """u over [−1e4, 1e4], log P = −inf, and an all-violating batch (log Z = −inf)."""
    u = jnp.array([-1e4, -300.0, -30.0, 0.0, 30.0, 300.0, 1e4])
    log_P = jnp.concatenate([-u - 5.0, jnp.array([-jnp.inf])])
    policy_logp = jnp.full(log_P.shape, -5.0)

    def loss(policy_logp, log_P, **kw):
        return fdpg_loss(f, policy_logp, log_P=log_P, **kw)[0]

    cases = [
        dict(log_Z=0.0),
        dict(),  # batch log Z
        dict(log_Z=0.0, proposal_logp=policy_logp - 1e4),  # huge importance weights
        dict(log_Z=0.0, proposal_logp=policy_logp + 1e4),  # vanishing importance weights
        dict(log_Z=-jnp.inf),
    ]
    for kw in cases:
        value, grad = jax.value_and_grad(loss)(policy_logp, log_P, **kw)
        assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad))), (f, kw)
    all_violating = jnp.full((4,), -jnp.inf)
    value, grad = jax.value_and_grad(loss)(jnp.full((4,), -3.0), all_violating)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))


def test_jit_matches_eager_and_loo_baseline_plugs_in():
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    policy_logp, log_P = jax.random.normal(k1, (16,)) - 8, jax.random.normal(k2, (16,)) - 7
    baseline = functools.partial(estimators.compute_baseline, "loo", estimators.baseline_init())
    eager = fdpg_loss("js", policy_logp, log_P=log_P, baseline=baseline)
    jitted = jax.jit(lambda a, b: fdpg_loss("js", a, log_P=b, baseline=baseline))(policy_logp, log_P)
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
    r = eager[1]["pseudo_reward"]
    np.testing.assert_allclose(eager[1]["advantage"], r - (jnp.sum(r) - r) / 15, rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_problem():
    x = jnp.zeros(4)
    with pytest.raises(ValueError, match="unknown f-divergence f='kll'"):
        fdpg_loss("kll", x, x, x)
    with pytest.raises(ValueError, match=r"reward has shape \(3,\) but policy_logp has shape \(4,\)"):
        fdpg_loss("js", x, x, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"policy_logp must be per-sequence, shape \[B\]"):
        fdpg_loss("js", jnp.zeros((4, 2)), log_P=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="give either log_P"):
        fdpg_loss("js", x)
    with pytest.raises(ValueError, match="not both"):
        fdpg_loss("js", x, x, x, log_P=x)
