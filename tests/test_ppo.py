import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdrl import divergences, ppo, toy


def numpy_gae(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        next_adv = 0.0
        for s in reversed(range(t)):
            if not mask[i, s]:
                next_adv = 0.0
                continue
            nxt = s + 1 < t and mask[i, s + 1]
            next_value = values[i, s + 1] if nxt else 0.0
            delta = rewards[i, s] + gamma * next_value - values[i, s]
            next_adv = delta + (gamma * lam * next_adv if nxt else 0.0)
            adv[i, s] = next_adv
    return adv


@pytest.mark.parametrize("gamma, lam", [(0.0, 0.0), (1.0, 1.0), (0.9, 0.95), (1.0, 0.0), (0.5, 1.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    lengths = np.array([9, 4, 1, 0, 7])
    mask = np.arange(9)[None] < lengths[:, None]
    adv, returns = ppo.gae(rewards, values, mask, gamma, lam)
    want = numpy_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want, atol=1e-5)
    np.testing.assert_allclose(returns, np.where(mask, want + values, 0.0), atol=1e-5)


def test_ppo_clip_behaviour():
    mask = jnp.ones((1, 1), bool)
    eps = 0.2
    for ratio, adv, clipped in [(1.5, 1.0, True), (1.5, -1.0, False), (0.5, 1.0, False), (0.5, -1.0, True),
                                (1.1, 1.0, False), (0.9, -1.0, False)]:
        old = jnp.zeros((1, 1))
        grad = jax.grad(lambda lp: ppo.ppo_policy_loss(lp, old, jnp.array([[adv]]), mask, eps)[0])(
            jnp.log(jnp.array([[ratio]])))
        loss = ppo.ppo_policy_loss(jnp.log(jnp.array([[ratio]])), old, jnp.array([[adv]]), mask, eps)[0]
        if clipped:  # the objective is flat: no gradient, loss at the clipped ratio
            assert float(grad[0, 0]) == 0.0
            assert float(loss) == pytest.approx(-np.clip(ratio, 1 - eps, 1 + eps) * adv)
        else:
            assert float(grad[0, 0]) == pytest.approx(-ratio * adv, rel=1e-5)
    with pytest.raises(ValueError, match="clip_eps must be in"):
        ppo.ppo_policy_loss(old, old, old, mask, 1.5)


def test_adaptive_kl_controller_moves_beta_the_right_way():
    state = ppo.kl_controller_init(0.1)
    up = ppo.adaptive_kl_update(state, jnp.array(2.0), target_kl=1.0, gain=0.1)
    down = ppo.adaptive_kl_update(state, jnp.array(0.5), target_kl=1.0, gain=0.1)
    assert float(up.beta) == pytest.approx(0.1 * (1 + 0.1 * 0.2))  # error clipped at +0.2
    assert float(down.beta) == pytest.approx(0.1 * (1 - 0.1 * 0.2))
    assert float(ppo.fixed_kl_update(state, jnp.array(9.0)).beta) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="initial beta must be > 0"):
        ppo.kl_controller_init(0.0)


def test_kl_estimators_whiten_and_masks():
    lp, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.0]])
    k = ppo.kl_per_token(lp, ref)
    np.testing.assert_allclose(k["k1"], [[0.5, -1.0]])
    assert bool(jnp.all(k["k3"] >= 0))
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[True, True, True, False]])
    w = ppo.whiten(x, mask)
    assert abs(float(ppo.masked_mean(w, mask))) < 1e-6 and float(w[0, 3]) == 0.0
    np.testing.assert_allclose(ppo.place_at_last_token(jnp.array([5.0]), mask), [[0, 0, 5, 0]])


# --- exact, by enumeration on the toy problem ------------------------------------

@functools.lru_cache(maxsize=None)
def toy_setup():
    problem = toy.make_problem(vocab_size=3, seq_len=3, seed=4)
    params = {"logits": problem.base_logits + 0.6 * jax.random.normal(jax.random.PRNGKey(1), problem.base_logits.shape)}
    return problem, params


def expected_ppo_gradient(problem, params, token_rewards):
    """E_{x~π}[∇ PPO surrogate] at ratio 1 with γ = λ = 1 and no critic, by enumeration."""
    seqs = problem.sequences
    mask = jnp.ones(seqs.shape, bool)
    old = toy.token_logp(problem, "tabular", params, seqs)
    adv, _ = ppo.gae(token_rewards(old), jnp.zeros(seqs.shape), mask, 1.0, 1.0)
    weight = jnp.exp(jnp.sum(old, 1)) * seqs.shape[0]  # π(x)·S: the batch mean becomes E_π

    def loss(p):
        logp = toy.token_logp(problem, "tabular", p, seqs)
        return ppo.ppo_policy_loss(logp, old, adv * weight[:, None], mask, 0.2, "sequence_sum")[0]

    return jax.grad(loss)(params)["logits"]


def test_fppo_rkl_equals_kl_penalised_rlhf_in_expected_gradient():
    problem, params = toy_setup()
    beta = 0.5
    target = toy.rlhf_target(problem, beta=beta)
    seqs = problem.sequences
    mask = jnp.ones(seqs.shape, bool)
    ref = toy.token_logp(problem, "tabular", {"logits": problem.base_logits}, seqs)
    reward = target.score  # r(x)
    classic = expected_ppo_gradient(problem, params, lambda old: ppo.rlhf_token_rewards(old, ref, reward, mask, beta))
    log_P = problem.base_logp + target.log_potential
    fppo = expected_ppo_gradient(problem, params, lambda old: ppo.fppo_token_rewards(
        "rkl", jnp.sum(old, 1), log_P, target.log_Z, mask))
    exact = jax.grad(lambda p: divergences.exact_divergence(
        "rkl", toy.all_logp(problem, "tabular", p), target.log_p))(params)["logits"]
    assert float(jnp.max(jnp.abs(exact))) > 1e-3
    np.testing.assert_allclose(classic, beta * fppo, atol=1e-5)
    np.testing.assert_allclose(fppo, exact, atol=1e-5)


@pytest.mark.parametrize("f", ["fkl", "rkl", "js", "tv", "hellinger", "chi2_pearson", "alpha=0.5"])
def test_fppo_surrogate_at_ratio_one_has_the_fdpg_gradient(f):
    problem, params = toy_setup()
    target = toy.rlhf_target(problem, beta=0.5)
    mask = jnp.ones(problem.sequences.shape, bool)
    log_P = problem.base_logp + target.log_potential
    got = expected_ppo_gradient(problem, params, lambda old: ppo.fppo_token_rewards(
        f, jnp.sum(old, 1), log_P, target.log_Z, mask))
    want = jax.grad(lambda p: divergences.exact_divergence(
        f, toy.all_logp(problem, "tabular", p), target.log_p))(params)["logits"]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_shapes_that_would_broadcast_are_named():
    """[B, 1] against [B, T] broadcasts in jnp without a word: every token function refuses it."""
    seq, short, per_seq = jnp.zeros((2, 5)), jnp.ones((2, 1)), jnp.zeros(3)
    cases = [
        (lambda: ppo.kl_per_token(seq, short), r"policy_logp \(2, 5\) and ref_logp \(2, 1\) shapes disagree"),
        (lambda: ppo.masked_mean(seq, short), r"x \(2, 5\) and mask \(2, 1\) shapes disagree"),
        (lambda: ppo.whiten(seq, short), r"x \(2, 5\) and mask \(2, 1\) shapes disagree"),
        (lambda: ppo.entropy(jnp.zeros((2, 5, 7)), short), r"logits \(2, 5, 7\) must be \[B, T, V\] with mask"),
        (lambda: ppo.entropy(seq, seq), r"logits \(2, 5\) must be \[B, T, V\]"),
        (lambda: ppo.place_at_last_token(per_seq, seq), r"per-sequence value \(3,\) must be \[B\] = \(2,\)"),
        (lambda: ppo.rlhf_token_rewards(seq, seq, per_seq, seq, 0.1), r"per-sequence value \(3,\)"),
        (lambda: ppo.fppo_token_rewards("js", jnp.zeros(2), jnp.zeros(2), 0.0, jnp.ones((3, 5))),
         r"per-sequence value \(2,\) must be \[B\] = \(3,\)"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_rlhf_score_is_finite_at_a_violated_constraint():
    """r = β·log φ with log φ clipped to ±max_abs_u: −inf (a hard constraint) and ±1e4 give
    finite scores, and GAE then whitening of their rewards stay finite (unclipped: NaN)."""
    log_potential = jnp.array([-jnp.inf, 1e4, -1e4, 2.5])
    score = ppo.rlhf_score(log_potential, 0.1, max_abs_u=30.0)
    np.testing.assert_allclose(score, [-3.0, 3.0, -3.0, 0.25], rtol=1e-6)
    mask = jnp.ones((4, 3), bool)
    logp = jnp.full((4, 3), -1.0)
    for s, finite in ((score, True), (0.1 * log_potential, False)):
        rewards = ppo.rlhf_token_rewards(logp, logp - 0.5, s, mask, 0.1)
        adv, _ = ppo.gae(rewards, jnp.zeros((4, 3)), mask, 1.0, 0.95)
        assert bool(jnp.all(jnp.isfinite(ppo.whiten(adv, mask)))) == finite
    with pytest.raises(ValueError, match="max_abs_u must be > 0, got 0"):
        ppo.rlhf_score(log_potential, 0.1, max_abs_u=0)
