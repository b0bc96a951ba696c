"""Quasi-rejection sampling (QRS): samples of the target p from any proposal q, with one
knob, β, that trades draws for exactness, and estimates of how exact the samples are.

Eikema, Kruszewski, Dance, Elsahar & Dymetman (2022), "An approximate sampler for
energy-based models with divergence diagnostics", TMLR (disco's QuasiRejectionSampler).

A draw x ~ q is kept with probability min(1, P(x) / (β q(x))). The kept draws follow

    p_β(x) = min(P(x), β q(x)) / Z_β,        Z_β = Σ_x min(P(x), β q(x)),

which is q (on p's support) for small β and p itself once β ≥ max_x P(x)/q(x); the
acceptance rate AR = Z_β / β falls as β grows. A policy trained by f-DPG is a proposal
close to p, so it reaches a given TV(p, p_β) with far fewer draws than the base model a.

With w = P/q and E_q a mean over draws of q (or, on an enumerable space, a sum weighted
by q itself: then every value below is exact):

    Z ≈ E_q[w]            Z_β ≈ E_q[min(w, β)]            AR ≈ Z_β / β
    TV(p, p_β) ≈ ½ E_q|w/Z − min(w, β)/Z_β|
    KL(p‖p_β)  ≈ E_q[(w/Z) · max(0, log w − log β)] + log Z_β − log Z
    TV(p, q)   ≈ ½ E_q|w/Z − 1|,   KL(p‖q) ≈ E_q[(w/Z) log(w/Z)]      (what QRS improves on)

Z is the mean over the draws themselves (self-normalised), so each estimate is the exact
divergence between the two distributions restricted to the draws. All in log space
(log β, log P, log q): on sequences w spans hundreds of nats. q must be positive wherever
P is (for a language model: pure sampling, temperature 1, no top-k or top-p); draws of q
cannot see mass of p outside q's support.
"""

from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdrl.estimators import log_target_weights

Array = jax.Array


def _check_shapes(log_P, proposal_logp, log_mass=None):
    log_P, proposal_logp = jnp.asarray(log_P, jnp.float32), jnp.asarray(proposal_logp, jnp.float32)
    if log_P.ndim != 1 or log_P.shape != proposal_logp.shape:
        raise ValueError(f"log_P and proposal_logp must be per-sequence with one shape [B]; got shapes "
                         f"{log_P.shape} and {proposal_logp.shape}")
    if log_P.shape[0] == 0:
        raise ValueError("QRS needs at least one draw of the proposal; got 0")
    if log_mass is None:
        log_mass = jnp.full(log_P.shape, -math.log(log_P.shape[0]), jnp.float32)
    else:
        log_mass = jnp.asarray(log_mass, jnp.float32)
        if log_mass.shape != log_P.shape:
            raise ValueError(f"log_mass has shape {log_mass.shape} but log_P has shape {log_P.shape}")
    return log_P, proposal_logp, log_mass


def _name_impossible_draws(impossible) -> None:
    """Raises, naming the indices, where `impossible` [B] (a bool mask) has any True."""
    bad = np.flatnonzero(np.asarray(impossible))
    if bad.size:
        raise ValueError(f"proposal_logp is -inf where log_P is not, at indices {bad[:8].tolist()}: draws of q "
                         "have q > 0 (an enumerated support with q = 0 there needs log_mass = proposal_logp)")


def _require_host_callbacks() -> None:
    """Host callbacks need JAX's CPU platform; JAX_PLATFORMS=cuda alone leaves it out, and the
    callback then fails only when it runs, with an INTERNAL error. Skipping the check instead
    would turn impossible draws into silent nan (ess, tv), so this names the fix at trace time."""
    try:
        jax.local_devices(backend="cpu")
    except RuntimeError as e:
        raise RuntimeError(f"fdrl.qrs under jit checks its draws through a host callback, which needs JAX's CPU "
                           f"platform, and JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r} leaves it out: "
                           "add cpu (e.g. JAX_PLATFORMS=cuda,cpu), or call it outside jit") from e


def _weights(log_P, proposal_logp, log_mass):
    """Per point [B]: log w = log P/q; log(m·w), p's unnormalised mass under the weighting m
    (P when m = q, including where q = 0); whether P > 0; whether q can draw it (m > 0)."""
    # A point with mass under the weighting but q = 0 and P > 0 cannot be a draw of q (its
    # weight P/q is infinite). Named at once where the values are known; under jit by a host
    # callback, whose ValueError surfaces in the runtime error when the result is computed.
    impossible = (proposal_logp == -jnp.inf) & (log_P > -jnp.inf) & (log_mass > -jnp.inf)
    if any(isinstance(x, jax.core.Tracer) for x in (log_P, proposal_logp, log_mass)):
        _require_host_callbacks()
        jax.debug.callback(_name_impossible_draws, impossible)
    else:
        _name_impossible_draws(impossible)
    log_w = log_target_weights(log_P, proposal_logp)
    in_support = log_P > -jnp.inf
    drawable = log_mass > -jnp.inf
    # m·w as log m + log w, the sum that m·min(w, β) repeats (p_β = p exactly once β ≥ w); P
    # itself where m = q = 0: p's mass that no draw of q can reach.
    log_p_unnorm = jnp.where(drawable, log_mass + log_w, jnp.where(in_support, log_P, -jnp.inf))
    return log_w, log_p_unnorm, in_support, drawable


def _log_capped(log_w, log_mass, drawable, log_beta):
    """log(m·min(w, β)) [B]: p_β's unnormalised mass, none where q cannot draw."""
    return jnp.where(drawable, log_mass + jnp.minimum(log_w, log_beta), -jnp.inf)


def _check_log_beta(log_beta):
    if isinstance(log_beta, (int, float)) and math.isnan(log_beta):
        raise ValueError("log_beta must be a number (±inf allowed), got nan")
    return jnp.asarray(log_beta, jnp.float32)


def log_acceptance(log_P: Array, proposal_logp: Array, log_beta) -> Array:
    """log min(1, P(x)/(β q(x))) [B] for draws x ~ q: −inf where P = 0, 0 where P ≥ βq.

    log_P, proposal_logp: [B]; log_beta: [] (−inf keeps every draw in p's support, +inf none).
    """
    log_P, proposal_logp, _ = _check_shapes(log_P, proposal_logp)
    log_beta = _check_log_beta(log_beta)
    log_w = log_target_weights(log_P, proposal_logp)
    # where, not a bare difference: −inf − (−inf) or inf − inf would be nan.
    return jnp.where(log_w == -jnp.inf, -jnp.inf, jnp.where(log_w == jnp.inf, 0.0, jnp.minimum(0.0, log_w - log_beta)))


def accept(key: Array, log_P: Array, proposal_logp: Array, log_beta) -> Array:
    """Which draws QRS keeps: bool [B], each with probability min(1, P/(βq)), independently."""
    log_accept = log_acceptance(log_P, proposal_logp, log_beta)
    return jnp.log(jax.random.uniform(key, log_accept.shape)) < log_accept


def diagnostics(log_P: Array, proposal_logp: Array, log_beta, log_mass: Optional[Array] = None) -> dict:
    """Estimates for QRS at β from draws x ~ q (module docstring), all [] float32:

      acceptance_rate   AR = Z_β / β
      tv, kl_p_pbeta    TV(p, p_β), KL(p‖p_β): how far the kept draws are from p
      tv_p_q, kl_p_q    TV(p, q), KL(p‖q): how far the draws themselves are
      log_Z, log_Z_beta the normalisers' estimates
      support           the mass of the draws with P > 0 (AR's largest value, as β → 0)
      ess               the effective sample size of the weights w, (Σw)²/Σw² (for draws)

    log_P, proposal_logp: [B] of the draws; log_beta: [] (±inf allowed). log_mass: [B],
    each point's probability under q; default −log B (B draws of q). On an enumerable
    space, pass the whole support and log_mass = proposal_logp for the exact values.
    When no draw has P > 0 there is no evidence of p: everything but log_Z (−inf) is 0.
    An enumerated support where q = 0 < P (a truncated policy) holds mass of p that QRS
    never reaches: the TVs count it, and KL(p‖p_β) and KL(p‖q) are +inf.
    """
    log_P, proposal_logp, log_mass = _check_shapes(log_P, proposal_logp, log_mass)
    log_beta = _check_log_beta(log_beta)
    log_w, log_p_unnorm, in_support, drawable = _weights(log_P, proposal_logp, log_mass)
    reachable = in_support & drawable
    # Below the smallest w that q can reach every β gives the same p_β (q on p's support)
    # and the same AR; clamping there keeps β → 0 finite.
    lowest = jnp.min(jnp.where(reachable, log_w, jnp.inf))
    log_beta = jnp.maximum(log_beta, jnp.where(jnp.any(reachable), lowest, 0.0))
    log_capped = _log_capped(log_w, log_mass, drawable, log_beta)
    log_Z = jax.nn.logsumexp(log_p_unnorm)
    log_Z_beta = jax.nn.logsumexp(log_capped)
    found = log_Z > -jnp.inf
    safe = lambda x: jnp.where(found, x, 0.0)  # noqa: E731  (no evidence: no nan from −inf − (−inf))
    p_mass = jnp.exp(log_p_unnorm - safe(log_Z))  # p's mass on each point; sums to 1
    # No reachable point: QRS keeps nothing, p_β has no mass (and AR is 0).
    p_beta_mass = jnp.exp(log_capped - jnp.where(log_Z_beta > -jnp.inf, log_Z_beta, 0.0))
    q_mass = jnp.exp(log_mass)
    # log(p/p_β), log(p/q) on p's support (+inf where the second has no mass); 0 elsewhere,
    # where p has no mass to weigh it.
    log_ratio_beta = jnp.where(log_capped > -jnp.inf, log_w - jnp.minimum(log_w, log_beta) + safe(log_Z_beta - log_Z),
                               jnp.inf)
    log_ratio_q = jnp.where(drawable, log_w - safe(log_Z), jnp.inf)

    def kl(log_ratio):  # Σ p log(p/·): +inf when p has mass where · has none
        finite = in_support & (log_ratio < jnp.inf)
        total = jnp.maximum(jnp.sum(jnp.where(finite, p_mass * jnp.where(finite, log_ratio, 0.0), 0.0)), 0.0)
        return jnp.where(jnp.any(in_support & ~finite), jnp.inf, total)

    return dict(
        acceptance_rate=safe(jnp.exp(jnp.minimum(log_Z_beta - log_beta, 0.0))),
        tv=safe(0.5 * jnp.sum(jnp.abs(p_mass - p_beta_mass))),
        kl_p_pbeta=safe(kl(log_ratio_beta)),
        tv_p_q=safe(0.5 * jnp.sum(jnp.abs(p_mass - q_mass))),
        kl_p_q=safe(kl(log_ratio_q)),
        log_Z=log_Z,
        log_Z_beta=jnp.where(found, log_Z_beta, -jnp.inf),
        support=jnp.sum(jnp.where(in_support, q_mass, 0.0)),
        ess=safe(1.0 / jnp.sum(p_mass ** 2)),
    )


def log_beta_for_acceptance(log_P: Array, proposal_logp: Array, acceptance_rate,
                            log_mass: Optional[Array] = None) -> Array:
    """log β [] at which `diagnostics` estimates this acceptance rate from the draws.

    AR(β) = E_q[min(w, β)]/β falls from the support's mass (β below every w) to 0: above the
    largest w it is Z/β (solved exactly), below it found by bisection. A rate above the
    support's mass gives the smallest β that keeps every draw with P > 0. 0 when no draw
    has P > 0 (any β then keeps nothing).
    """
    if isinstance(acceptance_rate, (int, float)) and not 0.0 < acceptance_rate <= 1.0:
        raise ValueError(f"acceptance_rate must be in (0, 1], got {acceptance_rate}")
    log_P, proposal_logp, log_mass = _check_shapes(log_P, proposal_logp, log_mass)
    log_target = jnp.log(jnp.asarray(acceptance_rate, jnp.float32))
    log_w, _, in_support, drawable = _weights(log_P, proposal_logp, log_mass)
    in_support = in_support & drawable  # the rate counts what q can draw
    lo = jnp.min(jnp.where(in_support, log_w, jnp.inf))
    hi = jnp.max(jnp.where(in_support, log_w, -jnp.inf))
    log_Z = jax.nn.logsumexp(_log_capped(log_w, log_mass, in_support, jnp.inf))  # Z over what q can draw
    log_rate = lambda lb: jax.nn.logsumexp(_log_capped(log_w, log_mass, drawable, lb)) - lb  # noqa: E731

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = log_rate(mid) > log_target  # AR still too high: β must grow
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo_safe, hi_safe = jnp.where(in_support.any(), lo, 0.0), jnp.where(in_support.any(), hi, 0.0)
    bisected = 0.5 * jnp.add(*jax.lax.fori_loop(0, 64, halve, (lo_safe, hi_safe)))
    closed = log_Z - log_target  # AR = Z/β once β ≥ every w
    support = jnp.sum(jnp.where(in_support, jnp.exp(log_mass), 0.0))
    result = jnp.where(closed >= hi, closed, jnp.where(log_target >= jnp.log(support), lo, bisected))
    return jnp.where(in_support.any(), result, 0.0)


class QRSDraws(NamedTuple):
    """What `sample_until` drew: the kept items (in draw order, at most num_accepted) and
    every draw's log P and log q, for `diagnostics`."""

    accepted: list
    log_P: np.ndarray  # [n] float32, every draw
    proposal_logp: np.ndarray  # [n]
    kept: np.ndarray  # [n] bool, which draws QRS kept (more than len(accepted) may be)


def sample_until(draw: Callable[[Array], tuple[Sequence, Array, Array]], key: Array, log_beta,
                 num_accepted: int, max_draws: int) -> QRSDraws:
    """Draws batches until `num_accepted` items are kept or `max_draws` are drawn (host loop).

    draw(key) → (items [n], log_P [n], proposal_logp [n]): one batch of the proposal, with
    each item's unnormalised target and proposal log-probabilities (a batch may overshoot
    max_draws; it is used whole). Keys are folded from `key` per batch.
    """
    if num_accepted < 1 or max_draws < 1:
        raise ValueError(f"num_accepted and max_draws must be >= 1, got {num_accepted} and {max_draws}")
    accepted, log_Ps, proposal_logps, kept = [], [], [], []
    drawn, i = 0, 0
    while len(accepted) < num_accepted and drawn < max_draws:
        draw_key, accept_key = jax.random.split(jax.random.fold_in(key, i))
        items, log_P, proposal_logp = draw(draw_key)
        keep = np.asarray(accept(accept_key, log_P, proposal_logp, log_beta))
        accepted += [item for item, k in zip(items, keep) if k]
        log_Ps.append(np.asarray(log_P, np.float32))
        proposal_logps.append(np.asarray(proposal_logp, np.float32))
        kept.append(keep)
        drawn += len(keep)
        i += 1
    return QRSDraws(accepted[:num_accepted], np.concatenate(log_Ps), np.concatenate(proposal_logps),
                    np.concatenate(kept))
