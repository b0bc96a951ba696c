"""Energy-based targets P(x) = a(x)·φ(x), as log-potentials added to log a(x).

    log P(x) = ref_logp(x) + log_potential(x)

  RLHF with KL penalty     log_potential = r(x)/β
  pointwise constraint     log_potential = log b(x), b ∈ {0, 1} (or [0, 1])
  distributional (GDC)     log_potential = λ·φ(x), λ fitted so E_p[φ] = μ̄
  products                 sums of the above

Every function is pure and takes arrays; scorers that produce r, b, φ live
elsewhere (fdrl/scorers, fdrl/toy).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def rlhf_log_potential(reward: Array, beta: float) -> Array:
    """r(x)/β: the target of KL-regularised RL, P = a·exp(r/β).

    Args:
      reward: [B] scalar rewards r(x).
      beta: KL coefficient, > 0.
    """
    beta = float(beta)
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta}")
    return jnp.asarray(reward, jnp.float32) / beta


def pointwise_log_potential(b: Array, log_floor: float = -math.inf) -> Array:
    """log b(x) for a pointwise constraint b(x) ∈ [0, 1].

    A violated hard constraint is log b = −inf, which f-DPG handles for every
    f (see losses.fdpg_loss). `log_floor` = log ε replaces b = 0 by ε: the
    target becomes a·max(b, ε), which has full support, so that KL(π‖p) and
    the rkl pseudo-reward 1 + log π − log p are finite. Use it for rkl (RLHF
    style) training on hard constraints.

    Args:
      b: [B] constraint values in [0, 1].
      log_floor: log ε, ≤ 0; −inf keeps the hard constraint.
    """
    if log_floor > 0:
        raise ValueError(f"log_floor is log ε and must be <= 0, got {log_floor}")
    b = jnp.asarray(b, jnp.float32)
    positive = b > 0
    log_b = jnp.log(jnp.where(positive, b, 1.0))
    return jnp.where(positive, jnp.maximum(log_b, log_floor), log_floor)


def distributional_log_potential(features: Array, lam: Array) -> Array:
    """λ·φ(x).

    Args:
      features: [B, K] features φ(x).
      lam: [K] coefficients.
    """
    features = jnp.asarray(features, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    if features.ndim != 2 or lam.shape != features.shape[-1:]:
        raise ValueError(f"features must be [B, K] and lam [K]; got {features.shape} and {lam.shape}")
    return features @ lam


class LambdaFit(NamedTuple):
    lam: Array  # [K]
    moments: Array  # [K] E_{p_λ}[φ] reached
    max_error: Array  # [] max_k |E_{p_λ}[φ_k] − μ̄_k|


def fit_lambda(
    features: Array,
    mu_bar: Array,
    log_weights: Array | None = None,
    num_iters: int = 50,
    damping: float = 1e-6,
) -> LambdaFit:
    """Fits λ so that p_λ ∝ a·exp(λ·φ) has moments E_{p_λ}[φ] = μ̄ (GDC).

    The base expectation is a weighted sum over points x_i: with
    log_weights = 0 the x_i are samples from a (importance-sampled fit, as
    GDC does on base-model samples); with log_weights = log a(x_i) over an
    enumerated support the fit is exact. It minimises the convex dual
    log Σ_i exp(ℓ_i + λ·φ_i) − λ·μ̄ by damped Newton steps: its gradient is
    E_λ[φ] − μ̄ and its Hessian Cov_λ(φ).

    Args:
      features: [N, K] φ(x_i).
      mu_bar: [K] target moments, strictly inside the range of φ.
      log_weights: [N] log weights ℓ_i of the base expectation (default 0).
      num_iters: Newton steps.
      damping: added to the Hessian's diagonal.
    """
    features = jnp.asarray(features, jnp.float32)
    mu_bar = jnp.asarray(mu_bar, jnp.float32)
    if features.ndim != 2 or mu_bar.shape != features.shape[-1:]:
        raise ValueError(f"features must be [N, K] and mu_bar [K]; got {features.shape} and {mu_bar.shape}")
    lo, hi = jnp.min(features, axis=0), jnp.max(features, axis=0)
    if bool(jnp.any((mu_bar <= lo) | (mu_bar >= hi))):
        fmt = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v.tolist()) + "]"
        raise ValueError(
            f"mu_bar={fmt(mu_bar)} must lie strictly between the min {fmt(lo)} and max {fmt(hi)} "
            "of the features, or no finite λ reaches it"
        )
    if log_weights is None:
        log_weights = jnp.zeros(features.shape[:1], jnp.float32)

    def moments(lam):
        probs = jax.nn.softmax(log_weights + features @ lam)
        mean = probs @ features
        centred = features - mean
        cov = (centred * probs[:, None]).T @ centred
        return mean, cov

    def newton(lam, _):
        mean, cov = moments(lam)
        step = jnp.linalg.solve(cov + damping * jnp.eye(lam.shape[0]), mean - mu_bar)
        # Cap the step: far from the solution the quadratic model overshoots.
        step = step * jnp.minimum(1.0, 5.0 / (jnp.max(jnp.abs(step)) + 1e-12))
        return lam - step, None

    lam, _ = jax.lax.scan(newton, jnp.zeros(features.shape[-1:], jnp.float32), None, length=num_iters)
    mean, _ = moments(lam)
    return LambdaFit(lam=lam, moments=mean, max_error=jnp.max(jnp.abs(mean - mu_bar)))
