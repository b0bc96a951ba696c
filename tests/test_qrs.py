"""Quasi-rejection sampling, against exact answers on the enumerable toy problem."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdrl import divergences, qrs, toy


def _problem_and_proposal(target_name="rlhf", seed=0):
    """The toy problem (4,096 sequences), a target, and a proposal q ≠ a over the support."""
    problem = toy.make_problem(seed=seed)
    target = toy.make_target(problem, target_name)
    noise = 0.7 * jax.random.normal(jax.random.PRNGKey(seed + 1), problem.base_logits.shape)
    params = {"logits": problem.base_logits + noise}
    return problem, target, params


def _exact_p_beta(log_P, log_q, log_beta):
    """log p_β over the support, straight from its definition: min(P, βq) normalised."""
    log_unnorm = jnp.minimum(log_P, log_beta + log_q)
    return log_unnorm - jax.nn.logsumexp(log_unnorm)


@pytest.mark.parametrize("target_name", ["rlhf", "pointwise", "distributional"])
def test_diagnostics_over_the_whole_support_are_exact(target_name):
    problem, target, params = _problem_and_proposal(target_name)
    log_q = toy.all_logp(problem, "tabular", params)
    log_P = problem.base_logp + target.log_potential
    log_w = np.asarray(log_P - log_q)
    for quantile in (0.0, 0.3, 0.7, 0.95, 1.0):
        log_beta = float(np.quantile(log_w[np.isfinite(log_w)], quantile))
        d = qrs.diagnostics(log_P, log_q, log_beta, log_mass=log_q)
        log_p_beta = _exact_p_beta(log_P, log_q, log_beta)
        Z_beta = float(jnp.sum(jnp.exp(jnp.minimum(log_P, log_beta + log_q))))
        assert float(d["log_Z"]) == pytest.approx(float(target.log_Z), abs=1e-5)
        assert float(d["acceptance_rate"]) == pytest.approx(Z_beta / math.exp(log_beta), rel=1e-4)
        assert float(d["tv"]) == pytest.approx(float(divergences.exact_divergence("tv", log_p_beta, target.log_p)),
                                               abs=1e-5)
        # KL(p‖p_β) = D_fkl(p_β, p) in the registry's argument order (π, p).
        assert float(d["kl_p_pbeta"]) == pytest.approx(
            float(divergences.exact_divergence("fkl", log_p_beta, target.log_p)), abs=1e-5)
        assert float(d["tv_p_q"]) == pytest.approx(float(divergences.exact_divergence("tv", log_q, target.log_p)),
                                                   abs=1e-5)
        assert float(d["kl_p_q"]) == pytest.approx(float(divergences.exact_divergence("fkl", log_q, target.log_p)),
                                                   abs=1e-5)
        expected_support = float(jnp.sum(jnp.where(jnp.isfinite(log_P), jnp.exp(log_q), 0.0)))
        assert float(d["support"]) == pytest.approx(expected_support, rel=1e-5)
    # β at the largest weight: p_β = p exactly, nothing left to correct.
    d = qrs.diagnostics(log_P, log_q, float(np.max(log_w)), log_mass=log_q)
    assert float(d["tv"]) < 1e-6 and float(d["kl_p_pbeta"]) < 1e-6


def test_the_kept_draws_follow_p_beta():
    """Draws of q kept by `accept` have the distribution p_β: their empirical TV to p_β is
    what sampling noise allows, and far below their distance to q or to p."""
    problem, target, params = _problem_and_proposal("rlhf")
    log_q = toy.all_logp(problem, "tabular", params)
    log_P = problem.base_logp + target.log_potential
    log_beta = float(np.quantile(np.asarray(log_P - log_q), 0.5))
    tokens, proposal_logp = toy.sample(problem, "tabular", params, jax.random.PRNGKey(3), 400_000)
    ids, draw_log_P = toy.score(problem, target, tokens)
    np.testing.assert_allclose(proposal_logp, log_q[ids], atol=1e-4)
    keep = np.asarray(qrs.accept(jax.random.PRNGKey(4), draw_log_P, proposal_logp, log_beta))
    kept = np.bincount(np.asarray(ids)[keep], minlength=log_q.shape[0]) / keep.sum()
    p_beta = np.exp(np.asarray(_exact_p_beta(log_P, log_q, log_beta)))
    tv = lambda a, b: 0.5 * np.abs(a - b).sum()  # noqa: E731
    d = qrs.diagnostics(log_P, log_q, log_beta, log_mass=log_q)
    assert keep.mean() == pytest.approx(float(d["acceptance_rate"]), abs=0.005)
    # 4,096 cells and ~200k kept draws: the empirical TV of exact p_β samples is ~0.05.
    assert tv(kept, p_beta) < 0.07
    assert tv(kept, np.exp(np.asarray(log_q))) > 0.2 and tv(kept, np.exp(np.asarray(target.log_p))) > 0.1
    # The draws' own estimates (self-normalised) are close to the exact values.
    est = qrs.diagnostics(draw_log_P, proposal_logp, log_beta)
    for name in ("acceptance_rate", "tv", "kl_p_pbeta", "tv_p_q", "kl_p_q", "log_Z"):
        assert float(est[name]) == pytest.approx(float(d[name]), abs=0.02), name


def test_rejection_sampling_of_a_pointwise_constraint_from_a_is_exact():
    """With q = a and b ∈ {0, 1}, w = b: β = 1 keeps exactly the draws with b = 1, and
    p_β = p (TV 0), with acceptance rate Z = E_a[b]."""
    problem = toy.make_problem()
    target = toy.make_target(problem, "pointwise")
    log_P = problem.base_logp + target.log_potential
    d = qrs.diagnostics(log_P, problem.base_logp, 0.0, log_mass=problem.base_logp)
    assert float(d["tv"]) == 0.0 and float(d["kl_p_pbeta"]) == 0.0
    assert float(d["acceptance_rate"]) == pytest.approx(math.exp(float(target.log_Z)), rel=1e-5)
    keep = qrs.accept(jax.random.PRNGKey(0), log_P, problem.base_logp, 0.0)
    np.testing.assert_array_equal(np.asarray(keep), np.isfinite(np.asarray(log_P)))


def test_log_beta_for_acceptance_reaches_the_rate():
    problem, target, params = _problem_and_proposal("rlhf")
    log_q = toy.all_logp(problem, "tabular", params)
    log_P = problem.base_logp + target.log_potential
    log_w = np.asarray(log_P - log_q)
    for rate in (1.0, 0.9, 0.5, 0.1, 1e-3, 1e-6):
        log_beta = qrs.log_beta_for_acceptance(log_P, log_q, rate, log_mass=log_q)
        got = float(qrs.diagnostics(log_P, log_q, log_beta, log_mass=log_q)["acceptance_rate"])
        assert got == pytest.approx(rate, rel=1e-3), rate
    # Tiny rates are past the largest weight: β = Z / rate exactly.
    assert float(qrs.log_beta_for_acceptance(log_P, log_q, 1e-6, log_mass=log_q)) == pytest.approx(
        float(target.log_Z) + 6 * math.log(10), abs=1e-4)
    assert float(qrs.log_beta_for_acceptance(log_P, log_q, 1.0, log_mass=log_q)) == pytest.approx(log_w.min(), abs=1e-5)
    # With draws (uniform masses) and jitted, with the rate as an array.
    draws = jax.random.choice(jax.random.PRNGKey(0), log_q.shape[0], (512,), p=jnp.exp(log_q))
    fn = jax.jit(qrs.log_beta_for_acceptance)
    log_beta = fn(log_P[draws], log_q[draws], jnp.float32(0.2))
    assert float(qrs.diagnostics(log_P[draws], log_q[draws], log_beta)["acceptance_rate"]) == pytest.approx(0.2, rel=1e-3)


def test_a_rate_above_the_support_gives_the_smallest_beta():
    """Half the draws have P = 0: no β accepts more than half; asking for more keeps every draw with P > 0."""
    log_P = jnp.array([0.0, -jnp.inf, 1.0, -jnp.inf])
    log_q = jnp.array([-1.0, -1.0, -2.0, -2.0])
    log_beta = qrs.log_beta_for_acceptance(log_P, log_q, 0.9)
    assert float(log_beta) == pytest.approx(1.0)  # the smallest w among the draws with P > 0
    d = qrs.diagnostics(log_P, log_q, log_beta)
    assert float(d["acceptance_rate"]) == pytest.approx(0.5) and float(d["support"]) == pytest.approx(0.5)
    keep = qrs.accept(jax.random.PRNGKey(0), log_P, log_q, log_beta)
    np.testing.assert_array_equal(np.asarray(keep), [True, False, True, False])


@pytest.mark.parametrize("log_beta", [-math.inf, -1e30, -50.0, 0.0, 50.0, 1e30, math.inf])
def test_extremes_stay_finite(log_beta):
    log_P = jnp.array([-jnp.inf, -300.0, 0.0, 80.0, -1e4])
    log_q = jnp.array([-1.0, -1e4, -0.1, -60.0, -1e-6])
    d = qrs.diagnostics(log_P, log_q, log_beta)
    for name, value in d.items():
        if name != "log_Z_beta" or math.isfinite(log_beta) or log_beta < 0:
            assert bool(jnp.isfinite(value)), (name, log_beta, value)
    assert 0.0 <= float(d["acceptance_rate"]) <= 1.0 and 0.0 <= float(d["tv"]) <= 1.0
    assert float(d["kl_p_pbeta"]) >= 0.0
    log_accept = qrs.log_acceptance(log_P, log_q, log_beta)
    assert not bool(jnp.any(jnp.isnan(log_accept))) and bool(jnp.all(log_accept <= 0.0))
    assert float(log_accept[0]) == -math.inf  # P = 0 is never kept, whatever β


def test_no_draw_in_the_support_is_zero_not_nan():
    log_P, log_q = jnp.full((3,), -jnp.inf), jnp.array([-1.0, -2.0, -3.0])
    d = qrs.diagnostics(log_P, log_q, 0.0)
    assert float(d["log_Z"]) == -math.inf
    assert all(float(v) == 0.0 for k, v in d.items() if k not in ("log_Z", "log_Z_beta"))
    assert float(qrs.log_beta_for_acceptance(log_P, log_q, 0.5)) == 0.0
    assert not bool(jnp.any(qrs.accept(jax.random.PRNGKey(0), log_P, log_q, -jnp.inf)))


def test_jit_equals_no_jit():
    log_P = jnp.array([-3.0, -jnp.inf, 2.0, 0.5])
    log_q = jnp.array([-1.0, -0.5, -2.0, -3.0])
    eager = qrs.diagnostics(log_P, log_q, 1.5)
    jitted = jax.jit(qrs.diagnostics)(log_P, log_q, 1.5)
    for k in eager:
        np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(eager[k]), rtol=1e-6, err_msg=k)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2,\)"):
        qrs.diagnostics(jnp.zeros(3), jnp.zeros(2), 0.0)
    with pytest.raises(ValueError, match=r"log_mass has shape \(2,\)"):
        qrs.diagnostics(jnp.zeros(3), jnp.zeros(3), 0.0, log_mass=jnp.zeros(2))
    with pytest.raises(ValueError, match="at least one draw"):
        qrs.log_acceptance(jnp.zeros(0), jnp.zeros(0), 0.0)
    with pytest.raises(ValueError, match="log_beta must be a number"):
        qrs.accept(jax.random.PRNGKey(0), jnp.zeros(3), jnp.zeros(3), float("nan"))
    for rate in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"acceptance_rate must be in \\(0, 1\\], got {rate}"):
            qrs.log_beta_for_acceptance(jnp.zeros(3), jnp.zeros(3), rate)
    with pytest.raises(ValueError, match="num_accepted and max_draws must be >= 1, got 0 and 5"):
        qrs.sample_until(lambda key: ([], jnp.zeros(0), jnp.zeros(0)), jax.random.PRNGKey(0), 0.0, 0, 5)


def test_sample_until_stops_at_the_count_or_the_budget():
    problem, target, params = _problem_and_proposal("rlhf")
    calls = []  # each batch's items, as drawn

    def draw(key):
        tokens, logp = toy.sample(problem, "tabular", params, key, 64)
        ids, log_P = toy.score(problem, target, tokens)
        calls.append([int(i) for i in ids])
        return calls[-1], log_P, logp

    log_q = toy.all_logp(problem, "tabular", params)
    log_P_all = problem.base_logp + target.log_potential
    log_beta = qrs.log_beta_for_acceptance(log_P_all, log_q, 0.25, log_mass=log_q)
    out = qrs.sample_until(draw, jax.random.PRNGKey(0), log_beta, num_accepted=40, max_draws=10_000)
    assert len(out.accepted) == 40 and out.kept.sum() >= 40 and len(out.log_P) == 64 * len(calls)
    assert len(out.kept) == len(out.proposal_logp) == len(out.log_P)
    assert out.kept.sum() - 40 < out.kept[-64:].sum()  # the last batch was the one that reached 40
    drawn = [item for batch in calls for item in batch]
    assert out.accepted == [item for item, k in zip(drawn, out.kept) if k][:40]
    # Same key, same draws; the budget stops a run that cannot fill its count.
    calls.clear()
    again = qrs.sample_until(draw, jax.random.PRNGKey(0), log_beta, num_accepted=40, max_draws=10_000)
    assert again.accepted == out.accepted
    capped = qrs.sample_until(draw, jax.random.PRNGKey(0), 1e9, num_accepted=5, max_draws=100)
    assert capped.accepted == [] and len(capped.log_P) == 128


@pytest.mark.parametrize("log_beta", [-math.inf, -1.0, 0.5, 3.0, math.inf])
def test_a_proposal_with_holes_in_p_support_is_exact_and_never_nan(log_beta):
    """An enumerated q that is 0 where P > 0 (a truncated policy): QRS never reaches that mass
    of p. The TVs count it, the KLs are +inf, AR and β count what q can draw; no nan."""
    P = np.array([0.1, 0.4, 0.2, 0.3, 0.0])
    q = np.array([0.5, 0.0, 0.3, 0.0, 0.2])
    with np.errstate(divide="ignore"):
        log_P, log_q = np.log(P).astype(np.float32), np.log(q).astype(np.float32)
    d = qrs.diagnostics(log_P, log_q, log_beta, log_mass=log_q)
    assert not any(bool(jnp.isnan(v)) for v in d.values()), d
    beta = min(max(math.exp(log_beta), 0.1 / 0.5), 1e30)  # clamped below at the smallest reachable w
    capped = np.minimum(P, beta * q)
    p = P / P.sum()
    assert float(d["log_Z"]) == pytest.approx(math.log(P.sum()), abs=1e-6)
    assert float(d["tv_p_q"]) == pytest.approx(0.5 * np.abs(p - q).sum(), abs=1e-6)
    assert float(d["tv"]) == pytest.approx(0.5 * np.abs(p - capped / capped.sum()).sum(), abs=1e-6)
    assert float(d["acceptance_rate"]) == pytest.approx(capped.sum() / beta, rel=1e-5)
    assert float(d["kl_p_q"]) == math.inf and float(d["kl_p_pbeta"]) == math.inf
    assert float(d["support"]) == pytest.approx(0.8)
    log_accept = qrs.log_acceptance(log_P, log_q, log_beta)
    assert not bool(jnp.any(jnp.isnan(log_accept))) and bool(jnp.all(log_accept <= 0.0))
    # β for a rate, over what q can draw (P·1[q > 0] sums to 0.3, its most is 0.8).
    for rate in (0.5, 0.1):
        got = qrs.diagnostics(log_P, log_q, qrs.log_beta_for_acceptance(log_P, log_q, rate, log_mass=log_q),
                              log_mass=log_q)["acceptance_rate"]
        assert float(got) == pytest.approx(rate, rel=1e-4)
    # Nothing q can draw lies in p's support: QRS keeps nothing, p_β has no mass.
    none = qrs.diagnostics(log_P[[1, 3, 4]], log_q[[1, 3, 4]], log_beta, log_mass=log_q[[1, 3, 4]])
    assert float(none["acceptance_rate"]) == 0.0 and float(none["tv"]) == pytest.approx(0.5)
    assert not any(bool(jnp.isnan(v)) for v in none.values()), none


def test_a_draw_with_q_zero_is_named():
    """Draws of q have q > 0: log q = −inf where P > 0 among draws is bad input, named."""
    with pytest.raises(ValueError, match=r"proposal_logp is -inf where log_P is not, at indices \[1\]"):
        qrs.diagnostics(jnp.array([0.0, -1.0, -jnp.inf]), jnp.array([-1.0, -jnp.inf, -jnp.inf]), 0.0)


def test_a_draw_with_q_zero_is_named_under_jit():
    """Under jit the values are unknown when tracing: a host callback names them when they run,
    rather than a silent nan. Valid input under jit equals the eager answer."""
    log_P, bad_q = jnp.array([0.0, -1.0, -jnp.inf]), jnp.array([-1.0, -jnp.inf, -jnp.inf])
    for fn in (qrs.diagnostics, qrs.log_beta_for_acceptance):
        with pytest.raises(Exception, match=r"proposal_logp is -inf where log_P is not, at indices \[1\]"):
            jax.block_until_ready(jax.jit(fn)(log_P, bad_q, 0.5))
    good_q = jnp.array([-1.0, -0.5, -jnp.inf])
    eager, jitted = qrs.diagnostics(log_P, good_q, 0.0), jax.jit(qrs.diagnostics)(log_P, good_q, 0.0)
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6, err_msg=key)


def test_without_jax_cpu_platform_jit_names_the_missing_platform(monkeypatch):
    """JAX_PLATFORMS=cuda alone leaves out the CPU platform that host callbacks need: there the
    callback failed with an INTERNAL error when run, and skipping the check would give silent
    nan (ess, tv) for impossible draws. Tracing fails instead, naming the fix; eager calls
    (no callback) still work and still name bad draws."""
    real = jax.local_devices

    def no_cpu(*args, backend=None, **kwargs):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(jax, "local_devices", no_cpu)
    # Shapes no other test traces with (jit reuses a trace of the same shapes).
    log_P, good_q = jnp.array([0.0, -1.0, -jnp.inf, -2.0, -3.0]), jnp.array([-1.0, -0.5, -jnp.inf, -2.0, -1.0])
    for fn in (qrs.diagnostics, qrs.log_beta_for_acceptance):
        with pytest.raises(RuntimeError, match=r"needs JAX's CPU platform.*JAX_PLATFORMS=cuda,cpu"):
            jax.jit(fn)(log_P, good_q, 0.5)
    eager = qrs.diagnostics(log_P, good_q, 0.0)
    assert not any(bool(jnp.isnan(v)) for v in eager.values()), eager
    with pytest.raises(ValueError, match=r"at indices \[1\]"):
        qrs.diagnostics(log_P, good_q.at[1].set(-jnp.inf), 0.0)
    monkeypatch.undo()
    assert "callback" in jax.jit(qrs.diagnostics).lower(log_P[:4], good_q[:4], 0.25).as_text()
