"""Token-level RL: GAE, PPO, value loss, KL estimators and controllers, and f-PPO.

Pure functions of arrays ([B, T] per token, `mask` True at real tokens, False
after EOS). Sequence-level reward placement:

  classic RLHF   r_t = −β(log π_t − log a_t) + 1[t = last]·score      (Ziegler et al. 2019)
  f-PPO          r_t = 1[t = last]·R(x),  R = −f'(π(x)/p(x))          (the f-DPG pseudo-reward)

For f = rkl and P = a·exp(r/β), R = r/β − (log π − log a) − 1 − log Z: up to the
factor β and a constant, the classic reward summed over the sequence. With
γ = λ = 1 and no critic the two give the same expected policy gradient (the
per-token form drops only KL terms before the current token, whose expected
score-function product vanishes); tests check this by enumeration.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from fdrl import divergences
from fdrl.losses import DEFAULT_MAX_ABS_U, clipped_pseudo_reward, log_ratio

Array = jax.Array
AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum")


def _check(name: str, x, shape=None, ndim=2) -> Array:
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims ([B, T]); got shape {x.shape}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape}")
    return x


def last_token_mask(mask: Array) -> Array:
    """[B, T] True at each row's last real token (rows with none: all False)."""
    mask = jnp.asarray(mask, bool)
    length = jnp.sum(mask, axis=1)
    return (jnp.arange(mask.shape[1])[None] == (length - 1)[:, None]) & (length > 0)[:, None]


def place_at_last_token(value: Array, mask: Array) -> Array:
    """[B] → [B, T]: value at the last real token, 0 elsewhere."""
    value, mask = jnp.asarray(value, jnp.float32), _check("mask", mask)
    if value.shape != mask.shape[:1]:
        raise ValueError(f"per-sequence value {value.shape} must be [B] = {mask.shape[:1]} to match mask {mask.shape}")
    return jnp.where(last_token_mask(mask), value[:, None], 0.0)


def kl_per_token(policy_logp: Array, ref_logp: Array) -> dict:
    """Per-token estimators of KL(π‖a) from x_t ~ π (Schulman's k1, k2, k3).

    k1 = log r, k2 = ½(log r)², k3 = (1/r − 1) + log r, with r = π_t/a_t.
    k1 is unbiased but signed, k3 unbiased and ≥ 0, k2 biased, low variance.
    """
    policy_logp, ref_logp = jnp.asarray(policy_logp, jnp.float32), jnp.asarray(ref_logp, jnp.float32)
    if policy_logp.shape != ref_logp.shape:  # [B, T] against [B, 1] would broadcast silently
        raise ValueError(f"policy_logp {policy_logp.shape} and ref_logp {ref_logp.shape} shapes disagree")
    log_ratio = policy_logp - ref_logp
    return dict(k1=log_ratio, k2=0.5 * log_ratio**2, k3=jnp.expm1(-log_ratio) + log_ratio)


def rlhf_score(log_potential: Array, beta, max_abs_u: float = DEFAULT_MAX_ABS_U) -> Array:
    """PPO-RLHF's sequence score r(x) = β·log φ(x) [B] from the target's log-potentials [B],
    with log φ clipped to ±max_abs_u (f-DPG's clip of log π − log p): a violated hard
    constraint (log φ = −inf) becomes a finite penalty of −β·max_abs_u, which GAE and
    advantage whitening would otherwise turn into NaN parameters."""
    if not max_abs_u > 0:
        raise ValueError(f"max_abs_u must be > 0, got {max_abs_u}")
    return beta * jnp.clip(jnp.asarray(log_potential, jnp.float32), -max_abs_u, max_abs_u)


def rlhf_token_rewards(policy_logp: Array, ref_logp: Array, score: Array, mask: Array, beta: float) -> Array:
    """r_t = −β(log π_t − log a_t), plus the sequence score at the last real token. [B, T]."""
    mask = _check("mask", mask)
    policy_logp = _check("policy_logp", policy_logp, mask.shape)
    ref_logp = _check("ref_logp", ref_logp, mask.shape)
    penalty = -beta * (policy_logp - ref_logp)
    return jnp.where(mask, penalty, 0.0) + place_at_last_token(score, mask)


def fppo_token_rewards(f, policy_seq_logp: Array, log_P: Array, log_Z: Array, mask: Array,
                       alpha: Optional[float] = None, max_abs_u: float = DEFAULT_MAX_ABS_U) -> Array:
    """f-PPO: the f-DPG pseudo-reward −f'(π(x)/p(x)) at the last real token. [B, T].

    Args:
      policy_seq_logp: [B] log π(x) of the rollout policy (sum of token log-probs).
      log_P: [B] unnormalised target log-scores; log_Z: [] or [B].
    """
    div = divergences.get_divergence(f, alpha=alpha)
    u, _ = log_ratio(policy_seq_logp, log_P, log_Z, max_abs_u)
    return place_at_last_token(jax.lax.stop_gradient(clipped_pseudo_reward(div, u, max_abs_u)), mask)


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016), a reverse scan.

        δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t,   A_t = δ_t + γλ·m_{t+1}·A_{t+1}

    The episode ends at the last real token (V after it is 0); masked steps get
    A = 0 and return 0.

    Args:
      rewards, values: [B, T] float; mask: [B, T] bool.

    Returns:
      (advantages [B, T], returns = advantages + values [B, T]).
    """
    mask = _check("mask", mask).astype(bool)
    rewards = _check("rewards", rewards, mask.shape).astype(jnp.float32)
    values = _check("values", values, mask.shape).astype(jnp.float32)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def step(next_adv, inputs):
        delta, nxt = inputs
        adv = delta + gamma * lam * nxt * next_adv
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros(mask.shape[0], jnp.float32), (deltas.T, next_mask.T.astype(jnp.float32)),
                          reverse=True)
    adv = jnp.where(mask, adv.T, 0.0)
    return adv, jnp.where(mask, adv + values, 0.0)


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of x over the entries where mask is true (0 if none); x and mask of one shape."""
    x, mask = jnp.asarray(x), jnp.asarray(mask)
    if x.shape != mask.shape:  # a [B, 1] mask would broadcast over [B, T] silently
        raise ValueError(f"x {x.shape} and mask {mask.shape} shapes disagree")
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """(x − mean)/std over the real tokens; masked entries stay 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0.0)


def _aggregate(per_token: Array, mask: Array, aggregation: str) -> Array:
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    per_seq = jnp.sum(jnp.where(mask, per_token, 0.0), axis=1)
    if aggregation == "sequence_sum":
        return jnp.mean(per_seq)
    if aggregation == "sequence_mean":
        return jnp.mean(per_seq / jnp.maximum(jnp.sum(mask, axis=1), 1))
    raise ValueError(f"unknown aggregation={aggregation!r}; choose one of {AGGREGATIONS}")


def ppo_policy_loss(policy_logp: Array, old_logp: Array, advantages: Array, mask: Array, clip_eps: float = 0.2,
                    aggregation: str = "token_mean"):
    """PPO's clipped surrogate (Schulman et al. 2017), per token:

        L_t = −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t),   ρ_t = π_θ(x_t)/π_old(x_t)

    Args:
      policy_logp: [B, T] differentiable; old_logp: [B, T] rollout log-probs.
      advantages: [B, T] (treated as constants).
      aggregation: "token_mean" (TRL's default), "sequence_mean", or
        "sequence_sum" (the sequence-level policy gradient of f-DPG).

    Returns:
      (loss, dict(clip_fraction, approx_kl = mean k3 of π_old‖π, ratio_mean)).
    """
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    mask = _check("mask", mask).astype(bool)
    policy_logp = _check("policy_logp", policy_logp, mask.shape)
    old_logp = jax.lax.stop_gradient(_check("old_logp", old_logp, mask.shape))
    advantages = jax.lax.stop_gradient(_check("advantages", advantages, mask.shape))
    log_ratio = jnp.where(mask, policy_logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    loss = _aggregate(-jnp.minimum(unclipped, clipped), mask, aggregation)
    diag = dict(
        clip_fraction=masked_mean((jnp.abs(ratio - 1) > clip_eps).astype(jnp.float32), mask),
        approx_kl=masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        ratio_mean=masked_mean(ratio, mask),
    )
    return loss, diag


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array, clip: float = 0.2) -> Array:
    """Clipped value loss: ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²), token mean."""
    mask = _check("mask", mask).astype(bool)
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy(logits: Array, mask: Array) -> Array:
    """Mean per-token entropy of softmax(logits) over real tokens. logits [B, T, V], mask [B, T]."""
    logits, mask = jnp.asarray(logits), jnp.asarray(mask)
    if logits.ndim != 3 or logits.shape[:2] != mask.shape:
        raise ValueError(f"logits {logits.shape} must be [B, T, V] with mask {mask.shape} = [B, T]")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return masked_mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1), mask)


class KLControllerState(NamedTuple):
    beta: Array  # [] current KL coefficient


def kl_controller_init(beta: float) -> KLControllerState:
    if not beta > 0:
        raise ValueError(f"initial beta must be > 0, got beta={beta}")
    return KLControllerState(beta=jnp.asarray(beta, jnp.float32))


def adaptive_kl_update(state: KLControllerState, kl: Array, target_kl: float, gain: float = 0.1) -> KLControllerState:
    """β ← β(1 + K·clip((KL − KL*)/KL*, −0.2, 0.2)) (Ziegler et al. 2019): β grows when
    the measured KL(π‖a) is above target, shrinks when below."""
    if not target_kl > 0:
        raise ValueError(f"target_kl must be > 0, got {target_kl}")
    error = jnp.clip((kl - target_kl) / target_kl, -0.2, 0.2)
    return KLControllerState(beta=state.beta * (1 + gain * error))


def fixed_kl_update(state: KLControllerState, kl: Array, target_kl: float = 1.0, gain: float = 0.0) -> KLControllerState:
    """The fixed controller: β stays."""
    del kl, target_kl, gain
    return state
