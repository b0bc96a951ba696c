"""Evaluation metrics from samples: divergence estimates to the target,
alignment, KL to the reference, and diversity. Each divergence estimate names
its estimator.

From x ~ π with log p = log P − log Ẑ (Ẑ the running importance-sampling
estimate) and u = log π − log p:

  kl_pi_p   KL(π‖p) = E_π[u]                                      (Monte Carlo)
  kl_p_pi   KL(p‖π) ≈ Σ w̃ log(B·w̃), w̃ = P/π normalised over the batch
            (SNIS with the batch's own Ẑ: KL(w̃‖uniform) ≥ 0; no running Ẑ needed)
  tv        TV = E_π[½|1 − e^(−u)|]                                (Monte Carlo, IS ratio)
  js        JS = E_π[½(u − (1 + e^(−u))(softplus(u) − log 2))]    (Monte Carlo, IS ratio)
  kl_pi_a   KL(π‖a) = E_π[log π − log a]                          (Monte Carlo)

All take arrays and are jit-able; u is clipped to ±30 so that no estimate
overflows, which only matters when a sample is 1e13 times likelier under one
distribution than the other.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdrl.estimators import log_target_weights
from fdrl.losses import log_ratio

Array = jax.Array
_LOG2 = math.log(2.0)
_U_CLIP = 30.0


def divergence_estimates(policy_logp: Array, log_P: Array, log_Z: Array, ref_logp: Array) -> dict:
    """Estimates from on-policy samples. All inputs [B] (log_Z [] or [B])."""
    policy_logp = jnp.asarray(policy_logp, jnp.float32)
    if policy_logp.ndim != 1:
        raise ValueError(f"policy_logp must be per-sequence, shape [B]; got shape {policy_logp.shape}")
    for name, x in (("log_P", log_P), ("ref_logp", ref_logp), ("log_Z", log_Z)):
        shape = jnp.shape(x)
        if shape != policy_logp.shape and not (name == "log_Z" and shape == ()):
            raise ValueError(f"{name} has shape {shape} but policy_logp has shape {policy_logp.shape}"
                             f"{' (log_Z may also be [])' if name == 'log_Z' else ''}")
    u, _ = log_ratio(policy_logp, log_P, log_Z, _U_CLIP)
    log_snis = jax.nn.log_softmax(log_target_weights(log_P, policy_logp))
    snis = jnp.exp(log_snis)
    finite = jnp.any(log_P > -jnp.inf)
    kl_p_pi = jnp.sum(jnp.where(snis > 0, snis * (jnp.where(snis > 0, log_snis, 0.0) + jnp.log(log_P.shape[0])), 0.0))
    return dict(
        kl_pi_p=jnp.mean(u),
        kl_p_pi=jnp.where(finite, kl_p_pi, 0.0),
        tv=jnp.mean(0.5 * jnp.abs(1.0 - jnp.exp(-u))),
        js=jnp.mean(0.5 * (u - (1.0 + jnp.exp(-u)) * (jax.nn.softplus(u) - _LOG2))),
        kl_pi_a=jnp.mean(policy_logp - ref_logp),
    )


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams in the batch (whitespace tokens)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU-4 with add-one smoothing for n > 1 and the brevity penalty."""
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
        max_ref = Counter()
        for ref in references:
            for gram, c in Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)).items():
                max_ref[gram] = max(max_ref[gram], c)
        overlap = sum(min(c, max_ref[g]) for g, c in hyp.items())
        total = max(sum(hyp.values()), 0)
        if n == 1 and overlap == 0:
            return 0.0
        smooth = 0 if n == 1 else 1
        log_precision += math.log((overlap + smooth) / (total + smooth)) if total + smooth > 0 else 0.0
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / max(len(hypothesis), 1))
    return brevity * math.exp(log_precision / max_n)


def self_bleu(texts: Sequence[str]) -> float:
    """Mean BLEU-4 of each text against the others (higher = less diverse)."""
    tokens = [t.split() for t in texts]
    if len(tokens) < 2:
        return 0.0
    return float(np.mean([_bleu(h, tokens[:i] + tokens[i + 1:]) for i, h in enumerate(tokens)]))


def diversity(texts: Sequence[str]) -> dict:
    return dict(distinct_1=distinct_n(texts, 1), distinct_2=distinct_n(texts, 2), distinct_3=distinct_n(texts, 3),
                self_bleu=self_bleu(texts))
