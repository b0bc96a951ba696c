"""The f-divergence registry.

Every divergence is D_f(π‖p) = E_p[f(π/p)] with f convex and f(1) = 0. The
estimator needs f' at t = π/p, and t is best handled in log space: each entry
provides `f_prime(u)` with u = log t = log π − log p, so that float32
log-probabilities never pass through exp(log t) before they must.

Each `Divergence` gives three functions:

  f(t)            the generator, on t > 0 (plots, tests);
  f_prime(u)      f'(exp(u)), finite for every finite u that does not overflow
                  the closed form (the loss clips u, see losses.fdpg_loss);
  pointwise(log_pi, log_p)
                  the summand p·f(π/p) of the exact divergence on a finite
                  support, written in π and p so that π = 0 or p = 0 take their
                  limit values (0 or +inf), never NaN.

`exact_divergence(div, log_pi, log_p)` sums the summands: the true D_f of two
distributions given as log-probabilities over the same enumerated support.

Names (all divergences are of π from p, D_f(π‖p)):

  fkl            KL(p‖π)             forward KL: GDC / DPG, mass-covering
  rkl            KL(π‖p)             reverse KL: RLHF, mode-seeking
  js             JS(π, p)            ½KL(π‖m) + ½KL(p‖m), m = (π+p)/2; ≤ log 2
  tv             TV(π, p)            ½Σ|π − p|; ≤ 1
  chi2_pearson   Σ(π−p)²/p           f(t) = (t−1)²        (Pearson χ² of π from p)
  chi2_neyman    Σ(p−π)²/π           f(t) = (1−t)²/t      (Neyman χ² of π from p)
  hellinger      Σ(√π − √p)²         f(t) = (√t − 1)²    (squared, no ½; ≤ 2)
  alpha          Amari α-divergence  f(t) = (t^α − αt − (1−α)) / (α(α−1))

The α family interpolates: α → 0 is fkl and α → 1 is rkl (their f differ from
the fkl/rkl generators by a linear term c·(t−1), which changes neither D_f nor
its gradient). `get_divergence("alpha", alpha=0)` returns that limit.

Scale of JS: f is the ½/½ generator, so the metric is bounded by log 2 and the
f-DPG gradient is the gradient of that same bounded JS. (disco's JS pseudo-reward
omits the ½; it is the gradient of 2·JS, i.e. the same direction at twice the
step size.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

_LOG2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Divergence:
    """An f-divergence D_f(π‖p) = E_p[f(π/p)].

    Attributes:
      name: registry name (with α for the alpha family, e.g. "alpha=0.5").
      f: generator on t = π/p > 0.
      f_prime: f'(exp(u)) as a function of u = log π − log p.
      pointwise: p·f(π/p) from (log π, log p); handles π = 0 and p = 0.
      bounded_pseudo_reward: True when −f'(u) is bounded above and below, so
        the f-DPG pseudo-reward needs no clipping of u.
    """

    name: str
    f: Callable[[Array], Array]
    f_prime: Callable[[Array], Array]
    pointwise: Callable[[Array, Array], Array]
    bounded_pseudo_reward: bool = False

    def pseudo_reward(self, u: Array) -> Array:
        """R = −f'(π/p) from u = log π − log p."""
        return -self.f_prime(u)

    def __hash__(self):  # static argument of jit
        return hash(self.name)

    def __eq__(self, other):
        return isinstance(other, Divergence) and other.name == self.name


def _where_positive(log_x: Array):
    """(is x > 0, log x with −inf replaced by 0): the double-where trick that
    keeps gradients NaN-free through branches that are masked out."""
    positive = log_x > -jnp.inf
    return positive, jnp.where(positive, log_x, 0.0)


# --- pointwise summands p·f(π/p), written in π and p ------------------------

def _fkl_pointwise(log_pi, log_p):
    # p log(p/π); p = 0 contributes 0; π = 0 < p gives +inf.
    p_pos, log_p_safe = _where_positive(log_p)
    value = jnp.exp(log_p_safe) * (log_p_safe - log_pi)
    return jnp.where(p_pos, value, 0.0)


def _rkl_pointwise(log_pi, log_p):
    pi_pos, log_pi_safe = _where_positive(log_pi)
    value = jnp.exp(log_pi_safe) * (log_pi_safe - log_p)
    return jnp.where(pi_pos, value, 0.0)


def _js_pointwise(log_pi, log_p):
    # ½[π log(π/m) + p log(p/m)], m = (π + p)/2.
    log_m = jnp.logaddexp(log_pi, log_p) - _LOG2
    pi_pos, log_pi_safe = _where_positive(log_pi)
    p_pos, log_p_safe = _where_positive(log_p)
    log_m_safe = jnp.where(pi_pos | p_pos, log_m, 0.0)
    a = jnp.where(pi_pos, jnp.exp(log_pi_safe) * (log_pi_safe - log_m_safe), 0.0)
    b = jnp.where(p_pos, jnp.exp(log_p_safe) * (log_p_safe - log_m_safe), 0.0)
    return 0.5 * (a + b)


def _tv_pointwise(log_pi, log_p):
    return 0.5 * jnp.abs(jnp.exp(log_pi) - jnp.exp(log_p))


def _chi2_pearson_pointwise(log_pi, log_p):
    # (π − p)²/p; p = 0 < π gives +inf.
    pi, p = jnp.exp(log_pi), jnp.exp(log_p)
    p_pos, log_p_safe = _where_positive(log_p)
    value = (pi - p) ** 2 / jnp.exp(log_p_safe)
    return jnp.where(p_pos, value, jnp.where(pi > 0, jnp.inf, 0.0))


def _chi2_neyman_pointwise(log_pi, log_p):
    return _chi2_pearson_pointwise(log_p, log_pi)


def _hellinger_pointwise(log_pi, log_p):
    return (jnp.exp(0.5 * log_pi) - jnp.exp(0.5 * log_p)) ** 2


def _alpha_pointwise(alpha: float):
    def pointwise(log_pi, log_p):
        # [π^α p^(1−α) − απ − (1−α)p] / (α(α−1)).
        pi_pos, log_pi_safe = _where_positive(log_pi)
        p_pos, log_p_safe = _where_positive(log_p)
        both = pi_pos & p_pos
        mixed = jnp.where(both, jnp.exp(alpha * log_pi_safe + (1 - alpha) * log_p_safe), 0.0)
        if alpha > 1:  # π > 0 = p: π^α p^(1−α) = +inf
            mixed = jnp.where(pi_pos & ~p_pos, jnp.inf, mixed)
        elif alpha < 0:  # p > 0 = π: +inf
            mixed = jnp.where(p_pos & ~pi_pos, jnp.inf, mixed)
        linear = alpha * jnp.exp(log_pi) + (1 - alpha) * jnp.exp(log_p)
        return (mixed - linear) / (alpha * (alpha - 1))
    return pointwise


# --- the registry ----------------------------------------------------------

def _fkl() -> Divergence:
    return Divergence(
        name="fkl",
        f=lambda t: -jnp.log(t),
        f_prime=lambda u: -jnp.exp(-u),
        pointwise=_fkl_pointwise,
    )


def _rkl() -> Divergence:
    return Divergence(
        name="rkl",
        f=lambda t: t * jnp.log(t),
        f_prime=lambda u: 1.0 + u,
        pointwise=_rkl_pointwise,
    )


def _js() -> Divergence:
    return Divergence(
        name="js",
        f=lambda t: 0.5 * (t * jnp.log(t) - (1 + t) * jnp.log((1 + t) / 2)),
        # ½[log 2 − log(1 + 1/t)] = ½[log 2 − softplus(−u)]: bounded above by
        # ½ log 2, linear in u as u → −∞.
        f_prime=lambda u: 0.5 * (_LOG2 - jax.nn.softplus(-u)),
        pointwise=_js_pointwise,
    )


def _tv() -> Divergence:
    return Divergence(
        name="tv",
        f=lambda t: 0.5 * jnp.abs(t - 1),
        f_prime=lambda u: 0.5 * jnp.sign(u),
        pointwise=_tv_pointwise,
        bounded_pseudo_reward=True,
    )


def _chi2_pearson() -> Divergence:
    return Divergence(
        name="chi2_pearson",
        f=lambda t: (t - 1) ** 2,
        f_prime=lambda u: 2.0 * jnp.expm1(u),
        pointwise=_chi2_pearson_pointwise,
    )


def _chi2_neyman() -> Divergence:
    return Divergence(
        name="chi2_neyman",
        f=lambda t: (1 - t) ** 2 / t,
        f_prime=lambda u: -jnp.expm1(-2.0 * u),
        pointwise=_chi2_neyman_pointwise,
    )


def _hellinger() -> Divergence:
    return Divergence(
        name="hellinger",
        f=lambda t: (jnp.sqrt(t) - 1) ** 2,
        f_prime=lambda u: -jnp.expm1(-0.5 * u),
        pointwise=_hellinger_pointwise,
    )


def _alpha(alpha: float) -> Divergence:
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got alpha={alpha!r}")
    if alpha == 0.0:  # limit α → 0: f(t) = t − 1 − log t, KL(p‖π)
        return Divergence(
            name="alpha=0",
            f=lambda t: t - 1 - jnp.log(t),
            f_prime=lambda u: -jnp.expm1(-u),
            pointwise=_fkl_pointwise,
        )
    if alpha == 1.0:  # limit α → 1: f(t) = t log t − t + 1, KL(π‖p)
        return Divergence(
            name="alpha=1",
            f=lambda t: t * jnp.log(t) - t + 1,
            f_prime=lambda u: u,
            pointwise=_rkl_pointwise,
        )
    scale = alpha * (alpha - 1)
    return Divergence(
        name=f"alpha={alpha:g}",
        f=lambda t: (t ** alpha - alpha * t - (1 - alpha)) / scale,
        # (t^(α−1) − 1)/(α − 1), in u: expm1((α−1)u)/(α−1).
        f_prime=lambda u: jnp.expm1((alpha - 1) * u) / (alpha - 1),
        pointwise=_alpha_pointwise(alpha),
    )


_REGISTRY = {
    "fkl": _fkl,
    "rkl": _rkl,
    "js": _js,
    "tv": _tv,
    "chi2_pearson": _chi2_pearson,
    "chi2_neyman": _chi2_neyman,
    "hellinger": _hellinger,
}

#: Every registry name; "alpha" also needs its α.
NAMES = tuple(_REGISTRY) + ("alpha",)


def get_divergence(name: str | Divergence, alpha: Optional[float] = None) -> Divergence:
    """Looks up a divergence by name.

    Args:
      name: one of `NAMES`, or "alpha=<α>", or a `Divergence` (returned as is).
      alpha: α for name "alpha".

    Raises:
      ValueError: unknown name, or "alpha" without α.
    """
    if isinstance(name, Divergence):
        return name
    if not isinstance(name, str):
        raise ValueError(f"f must be a divergence name (one of {NAMES}), got {name!r}")
    key = name.strip().lower()
    if key.startswith("alpha="):
        try:
            return _alpha(float(key.split("=", 1)[1]))
        except ValueError:
            raise ValueError(f"cannot read α from f={name!r}; write e.g. 'alpha=0.5'") from None
    if key == "alpha":
        if alpha is None:
            raise ValueError("f='alpha' needs a value: pass alpha=<α> (or f='alpha=0.5')")
        return _alpha(alpha)
    if key not in _REGISTRY:
        raise ValueError(f"unknown f-divergence f={name!r}; choose one of {NAMES}")
    return _REGISTRY[key]()


def exact_divergence(div: str | Divergence, log_pi: Array, log_p: Array, axis: int = -1) -> Array:
    """Exact D_f(π‖p) = Σ_x p(x) f(π(x)/p(x)) over an enumerated support.

    Args:
      div: a divergence or its name.
      log_pi: [..., S] log π over the support (normalised; −inf allowed).
      log_p: [..., S] log p over the same support (normalised; −inf allowed).

    Returns:
      [...] the divergence; +inf where it is infinite (e.g. KL(π‖p) when p has
      zeros that π does not).
    """
    div = get_divergence(div)
    log_pi = jnp.asarray(log_pi, jnp.float32)
    log_p = jnp.asarray(log_p, jnp.float32)
    if log_pi.shape != log_p.shape:
        raise ValueError(f"log_pi and log_p shapes disagree: {log_pi.shape} vs {log_p.shape}")
    # Clamp tiny negative rounding (e.g. TV of identical inputs) at 0.
    return jnp.maximum(jnp.sum(div.pointwise(log_pi, log_p), axis=axis), 0.0)
