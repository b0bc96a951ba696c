"""Pure losses. Arrays in, (loss, diagnostics) out; no model, no state.

f-DPG (Go et al. 2023, "Aligning Language Models with Preferences through
f-divergence Minimization"): for samples x ~ q,

    log p(x) = log P(x) − log Z,    u = log π(x) − log p(x),
    R(x) = −f'(π(x)/p(x)),          A = R − B,
    w(x) = π(x)/q(x),
    L = −Σ_i s_i · sg(w_i A_i) · log π_θ(x_i) / Σ_i s_i,

whose gradient has expectation ∇_θ D_f(π_θ‖p) when log Z is exact and B does
not depend on the sample. sg is stop_gradient; s are optional sample weights
(uniform by default: the sequence-level mean of the paper).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from fdrl import divergences
from fdrl.estimators import log_target_weights, weighted_mean

Array = jax.Array

#: |u| is clipped here before f' is applied, and |R| at e^30 ≈ 1e13 after: that
#: keeps products of pseudo-rewards, importance weights and log-probs far from
#: float32 overflow.
DEFAULT_MAX_ABS_U = 30.0
#: log importance weights log(π/q) are clipped above here.
DEFAULT_MAX_LOG_WEIGHT = 30.0


def _as_batch(name: str, x, batch_shape=None) -> Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 1:
        raise ValueError(f"{name} must be per-sequence, shape [B]; got shape {x.shape}")
    if batch_shape is not None and x.shape != batch_shape:
        raise ValueError(f"{name} has shape {x.shape} but policy_logp has shape {batch_shape}")
    return x


def log_ratio(policy_logp: Array, log_P: Array, log_Z: Array, max_abs_u: float = DEFAULT_MAX_ABS_U):
    """(u, log p): u = log π − log p clipped to ±max_abs_u, log p = log P − log Z.

    P = 0 stays p = 0 even when log Z = −inf, and p = 0 means π/p = +inf (then
    clipped) whatever π is: no inf − inf anywhere. Shapes broadcast ([B] with []).
    """
    log_p = jnp.where(log_P == -jnp.inf, -jnp.inf, log_P - log_Z)
    u = jnp.where(log_p == -jnp.inf, jnp.inf, policy_logp - log_p)
    return jnp.clip(u, -max_abs_u, max_abs_u), log_p


def clipped_pseudo_reward(div: divergences.Divergence, u: Array, max_abs_u: float = DEFAULT_MAX_ABS_U) -> Array:
    """R = −f'(e^u), |R| ≤ exp(max_abs_u) (f' of χ²-Neyman or α < 0 outgrows e^|u|)."""
    bound = math.exp(max_abs_u)
    return jnp.clip(div.pseudo_reward(u), -bound, bound)


def fdpg_loss(
    f,
    policy_logp: Array,
    ref_logp: Optional[Array] = None,
    reward: Optional[Array] = None,
    *,
    log_P: Optional[Array] = None,
    proposal_logp: Optional[Array] = None,
    log_Z: Optional[Array] = None,
    baseline: Optional[Array] = None,
    sample_weight: Optional[Array] = None,
    alpha: Optional[float] = None,
    max_abs_u: float = DEFAULT_MAX_ABS_U,
    max_log_weight: float = DEFAULT_MAX_LOG_WEIGHT,
):
    """The f-DPG surrogate loss for a batch of sequences.

    Args:
      f: divergence name ("fkl", "rkl", "js", "tv", "chi2_pearson",
        "chi2_neyman", "hellinger", "alpha") or a `Divergence`.
      policy_logp: [B] log π_θ(x), differentiable (sum of token log-probs).
      ref_logp: [B] log a(x) of the reference model.
      reward: [B] the log-potential, so that log P = ref_logp + reward:
        r/β for RLHF, log b for a pointwise constraint, λ·φ for GDC moments.
      log_P: [B] the unnormalised target log-score; give it instead of
        (ref_logp, reward). −inf (a violated hard constraint) is allowed.
      proposal_logp: [B] log q(x) of the distribution x was drawn from.
        Default: q = π (on-policy, importance weights 1).
      log_Z: [] log of the target's normaliser. Default: the batch
        importance-sampling estimate log mean(P/q) (biased in log space; pass
        a running estimate from `estimators.log_z_update` in training).
      baseline: [] or [B], or a function (pseudo_reward [B], weights [B]) →
        [] or [B], e.g. `partial(estimators.compute_baseline, "loo", state)`.
        Default: the batch's self-normalised weighted mean of R.
      sample_weight: [B] non-negative weights of a weighted mean over the
        batch (0 masks a padded row). Default: uniform, the sequence mean.
      alpha: α when f is "alpha".
      max_abs_u: u is clipped to [−max_abs_u, max_abs_u] before f', and the
        pseudo-reward to |R| ≤ exp(max_abs_u) after (f' of χ²-Neyman or α < 0
        grows faster than e^|u|). On u = ±inf (e.g. log P = −inf) this keeps
        the loss finite for f with unbounded f' (rkl, χ²); it does not bind
        on ordinary batches.
      max_log_weight: log(π/q) is clipped above at this value.

    Returns:
      (loss [], diagnostics) where diagnostics holds [B] arrays `u`,
      `pseudo_reward`, `advantage`, `importance_weight`, `log_p`, and []
      `log_Z`, `baseline_mean`.
    """
    div = divergences.get_divergence(f, alpha=alpha)
    policy_logp = _as_batch("policy_logp", policy_logp)
    shape = policy_logp.shape

    if log_P is None:
        if ref_logp is None or reward is None:
            raise ValueError("give either log_P, or both ref_logp and reward (log P = ref_logp + reward)")
        ref_logp = _as_batch("ref_logp", ref_logp, shape)
        reward = _as_batch("reward", reward, shape)
        log_P = ref_logp + reward
    else:
        if ref_logp is not None or reward is not None:
            raise ValueError("give log_P or (ref_logp, reward), not both")
        log_P = _as_batch("log_P", log_P, shape)
    if not 0 < max_abs_u <= 40:  # e^40 · e^40 · |log π| stays below float32's max
        raise ValueError(f"max_abs_u must be in (0, 40], got {max_abs_u}")

    behaviour_logp = jax.lax.stop_gradient(policy_logp)
    if proposal_logp is None:
        log_w = jnp.zeros(shape, jnp.float32)
        proposal = behaviour_logp
    else:
        proposal = _as_batch("proposal_logp", proposal_logp, shape)
        log_w = jnp.minimum(behaviour_logp - proposal, max_log_weight)
    importance_weight = jnp.exp(log_w)

    if sample_weight is None:
        sample_weight = jnp.ones(shape, jnp.float32)
    else:
        sample_weight = _as_batch("sample_weight", sample_weight, shape)

    if log_Z is None:
        # log Σ s·P/q − log Σ s: the batch estimate of Z.
        log_Z = (jax.nn.logsumexp(log_target_weights(log_P, proposal), b=sample_weight)
                 - jnp.log(jnp.maximum(jnp.sum(sample_weight), 1e-30)))
    log_Z = jax.lax.stop_gradient(jnp.asarray(log_Z, jnp.float32))

    u, log_p = log_ratio(behaviour_logp, log_P, log_Z, max_abs_u)
    pseudo_reward = clipped_pseudo_reward(div, u, max_abs_u)

    weights = sample_weight * importance_weight
    if baseline is None:
        baseline = weighted_mean(pseudo_reward, weights)
    elif callable(baseline):
        baseline = baseline(pseudo_reward, weights)
    baseline = jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), shape))
    advantage = pseudo_reward - baseline

    coeff = jax.lax.stop_gradient(importance_weight * advantage)
    total_weight = jnp.sum(sample_weight)
    loss = -jnp.sum(sample_weight * coeff * policy_logp) / jnp.where(total_weight > 0, total_weight, 1.0)

    diagnostics = dict(
        u=u,
        pseudo_reward=pseudo_reward,
        advantage=advantage,
        importance_weight=importance_weight,
        log_p=log_p,
        log_Z=log_Z,
        baseline_mean=jnp.mean(baseline),
    )
    return loss, diagnostics
