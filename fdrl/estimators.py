"""Running estimators as explicit state: log Z and the pseudo-reward baseline.

Each state is a NamedTuple of arrays (a pytree): pass it in, get the new one
back, checkpoint it with the rest of the train state. Nothing here is hidden.

log Z.  Z = Σ_x P(x) = E_q[P(x)/q(x)] for any proposal q, so the running mean
of the importance weights P/q over all samples so far is an unbiased estimate
of Z (DPG, Parshakova et al. 2019). It is accumulated in log space with
logsumexp, never as an exp of a sum, so huge weights do not overflow and
P = 0 samples (log P = −inf) simply add nothing.

Baselines.  Any baseline B that does not depend on the sample keeps the f-DPG
gradient unbiased (E_π[∇ log π] = 0). Kinds:

  "none"    B = 0
  "batch"   B = the batch's importance-weighted mean of R (self-normalised)
  "loo"     leave-one-out: B_i = the weighted mean of R over the other samples
            (unbiased for on-policy samples, the RLOO baseline)
  "ema"     exponential moving average of past batch means (decay in config)
  "window"  mean of the last W batch means

"ema" and "window" read the state *before* this batch is added, so B does not
depend on the current samples; on the first step they fall back to "batch".
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

BASELINES = ("none", "batch", "loo", "ema", "window")


class LogZState(NamedTuple):
    """log Σ_i P(x_i)/q(x_i) over every sample seen, and how many there were."""

    log_sum: Array  # [] float32
    count: Array  # [] float32 (exact up to 2^24 samples)


def log_target_weights(log_P: Array, proposal_logp: Array) -> Array:
    """log(P(x)/q(x)), with P = 0 staying −inf whatever q is (never −inf − (−inf))."""
    return jnp.where(log_P == -jnp.inf, -jnp.inf, log_P - proposal_logp)


def log_z_init(num_contexts: int | None = None) -> LogZState:
    """One running Z, or one Z_c per context (conditional targets, CDPG)."""
    shape = () if num_contexts is None else (num_contexts,)
    return LogZState(log_sum=jnp.full(shape, -jnp.inf, jnp.float32), count=jnp.zeros(shape, jnp.float32))


def log_z_update(state: LogZState, log_P: Array, proposal_logp: Array, context_ids: Array | None = None) -> LogZState:
    """Adds a batch of importance weights P(x)/q(x) for x ~ q.

    Args:
      state: running sums ([] or [K] per context).
      log_P: [B] unnormalised target log-scores (−inf allowed).
      proposal_logp: [B] log q(x) of the proposal that drew the samples.
      context_ids: [B] int context of each sample, for a per-context state.
    """
    log_P = jnp.asarray(log_P, jnp.float32)
    proposal_logp = jnp.asarray(proposal_logp, jnp.float32)
    if log_P.ndim != 1 or log_P.shape != proposal_logp.shape:
        raise ValueError(f"log_P and proposal_logp must both be [B]; got {log_P.shape} and {proposal_logp.shape}")
    log_w = log_target_weights(log_P, proposal_logp)
    if state.log_sum.ndim == 0:
        if context_ids is not None:
            raise ValueError("context_ids given but the log Z state is not per-context (log_z_init(num_contexts))")
        return LogZState(log_sum=jnp.logaddexp(state.log_sum, jax.nn.logsumexp(log_w)),
                         count=state.count + log_P.shape[0])
    if context_ids is None or context_ids.shape != log_P.shape:
        raise ValueError(f"a per-context log Z state needs context_ids of shape {log_P.shape}")
    k = state.log_sum.shape[0]
    # Segment logsumexp: shift each context by its max so that exp cannot overflow.
    top = jax.ops.segment_max(log_w, context_ids, num_segments=k)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jax.ops.segment_sum(jnp.exp(log_w - top[context_ids]), context_ids, num_segments=k)
    batch_log_sum = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + top, -jnp.inf)
    counts = jax.ops.segment_sum(jnp.ones_like(log_w), context_ids, num_segments=k)
    return LogZState(log_sum=jnp.logaddexp(state.log_sum, batch_log_sum), count=state.count + counts)


def log_z_value(state: LogZState, context_ids: Array | None = None) -> Array:
    """log Ẑ = log(mean of P/q). −inf while every sample so far had P = 0
    (then the exact estimate is Ẑ = 0); 0 before any sample. For a per-context
    state, [K], or [B] gathered at `context_ids`."""
    seen = state.count > 0
    value = jnp.where(seen, state.log_sum - jnp.log(jnp.where(seen, state.count, 1.0)), 0.0)
    return value if context_ids is None or value.ndim == 0 else value[context_ids]


class BaselineState(NamedTuple):
    """Running statistics of past batch-mean pseudo-rewards."""

    ema: Array  # [] exponential moving average
    window: Array  # [W] ring buffer of the last W batch means
    count: Array  # [] int32, number of batches added


def baseline_init(window_size: int = 10) -> BaselineState:
    if window_size < 1:
        raise ValueError(f"baseline window_size must be >= 1, got {window_size}")
    return BaselineState(
        ema=jnp.array(0.0, jnp.float32),
        window=jnp.zeros((window_size,), jnp.float32),
        count=jnp.array(0, jnp.int32),
    )


def weighted_mean(values: Array, weights: Optional[Array] = None) -> Array:
    """Σ w·v / Σ w ([B] → []); the plain mean when weights is None; 0 if Σ w = 0."""
    if weights is None:
        return jnp.mean(values)
    if jnp.shape(values) != jnp.shape(weights):  # [B] against [B, 1] would broadcast silently
        raise ValueError(f"values {jnp.shape(values)} and weights {jnp.shape(weights)} shapes disagree")
    total = jnp.sum(weights)
    return jnp.where(total > 0, jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0), 0.0)


def baseline_update(state: BaselineState, batch_mean: Array, decay: float = 0.9) -> BaselineState:
    """Adds one batch mean to the EMA and the window."""
    batch_mean = jnp.asarray(batch_mean, jnp.float32)
    ema = jnp.where(state.count == 0, batch_mean, decay * state.ema + (1 - decay) * batch_mean)
    size = state.window.shape[0]
    window = state.window.at[state.count % size].set(batch_mean)
    return BaselineState(ema=ema, window=window, count=state.count + 1)


def compute_baseline(
    kind: str,
    state: BaselineState,
    rewards: Array,
    weights: Optional[Array] = None,
) -> Array:
    """The baseline for each sample of a batch.

    Args:
      kind: one of `BASELINES`.
      state: running statistics (read, not updated).
      rewards: [B] pseudo-rewards R.
      weights: [B] importance weights π/q (None when on-policy).

    Returns:
      [B] baseline (the same value for every sample except for "loo").
    """
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline kind={kind!r}; choose one of {BASELINES}")
    rewards = jnp.asarray(rewards, jnp.float32)
    batch = weighted_mean(rewards, weights)
    if kind == "none":
        value = jnp.zeros_like(batch)
    elif kind == "batch":
        value = batch
    elif kind == "loo":
        w = jnp.ones_like(rewards) if weights is None else weights
        rest_w = jnp.sum(w) - w
        rest = jnp.sum(w * rewards) - w * rewards
        return jnp.where(rest_w > 0, rest / jnp.where(rest_w > 0, rest_w, 1.0), 0.0)
    elif kind == "ema":
        value = jnp.where(state.count > 0, state.ema, batch)
    else:  # window
        size = state.window.shape[0]
        filled = jnp.minimum(state.count, size)
        window_mean = jnp.sum(jnp.where(jnp.arange(size) < filled, state.window, 0.0)) / jnp.maximum(filled, 1)
        value = jnp.where(state.count > 0, window_mean, batch)
    return jnp.broadcast_to(value, rewards.shape)
