"""An alignment problem small enough that every number is exact.

Sequences x ∈ {0..V−1}^L (V=4, L=6 by default: 4,096 sequences) from an
autoregressive base model a(x) = Π_t a(x_t | x_<t) whose next-token logits are a
random table over prefixes, fixed by a seed. Enumerating the support gives log a,
log P, log Z and log π of every sequence, hence exact divergences, moments and
gradients; training still uses sampled batches only.

Policy families (both start exactly at a):

  "tabular"  one logit vector per prefix: fully expressive, π = p is reachable.
  "shared"   a's logits plus a bias[prev_token, token] shared by all positions
             and prefixes: V·(V+1) parameters, misspecified, so the choice of f
             changes the optimum (mode-seeking vs mass-covering).

Targets (DESIGN.md §1):

  "pointwise"       b(x) = 1[token 0 occurs at least `min_count` times]
  "rlhf"            r(x) = fraction of tokens equal to 1, P = a·exp(r/β)
  "distributional"  φ(x) = 1[token 2 occurs at least 3 times] (≈ 0.19 under a),
                    λ fitted so E_p[φ] = μ̄ (0.5 by default)
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdrl import divergences, targets

Array = jax.Array

FAMILIES = ("tabular", "shared")
TARGETS = ("pointwise", "rlhf", "distributional")


class ToyProblem(NamedTuple):
    """Arrays of the enumerated problem (a pytree; V and L come from shapes)."""

    base_logits: Array  # [P, V] next-token logits of a, one row per prefix
    sequences: Array  # [S, L] int32, every sequence, in base-V order
    base_logp: Array  # [S] log a(x)

    @property
    def vocab_size(self) -> int:
        return self.base_logits.shape[1]

    @property
    def seq_len(self) -> int:
        return self.sequences.shape[1]


class ToyTarget(NamedTuple):
    """A target over the enumerated support."""

    log_potential: Array  # [S] log P(x) − log a(x)
    score: Array  # [S] what alignment measures: b(x), r(x) or φ(x)
    log_p: Array  # [S] exact normalised log p(x)
    log_Z: Array  # [] exact log Z


def num_prefixes(vocab_size: int, seq_len: int) -> int:
    return sum(vocab_size**t for t in range(seq_len))


def make_problem(vocab_size: int = 4, seq_len: int = 6, seed: int = 0, logit_scale: float = 1.5) -> ToyProblem:
    """A random tabular base model over V^L sequences."""
    if vocab_size < 2 or seq_len < 1:
        raise ValueError(f"need vocab_size >= 2 and seq_len >= 1, got {vocab_size}, {seq_len}")
    if vocab_size**seq_len > 2**20:
        raise ValueError(f"V^L = {vocab_size}^{seq_len} sequences is too many to enumerate (max 2^20)")
    rng = np.random.default_rng(seed)
    logits = logit_scale * rng.standard_normal((num_prefixes(vocab_size, seq_len), vocab_size))
    sequences = np.array(list(itertools.product(range(vocab_size), repeat=seq_len)), np.int32)
    base_logits = jnp.asarray(logits, jnp.float32)
    base_logp = _tabular_logp(base_logits, jnp.asarray(sequences))
    return ToyProblem(base_logits=base_logits, sequences=jnp.asarray(sequences), base_logp=base_logp)


def prefix_index(tokens: Array, vocab_size: int) -> Array:
    """[B, L] index of the prefix x_<t in the prefix table (row 0 = empty)."""
    batch, seq_len = tokens.shape
    index, code, offset = [], jnp.zeros((batch,), jnp.int32), 0
    for t in range(seq_len):
        index.append(offset + code)
        code = code * vocab_size + tokens[:, t]
        offset += vocab_size**t
    return jnp.stack(index, axis=1)


def sequence_id(tokens: Array, vocab_size: int) -> Array:
    """[B] position of each sequence in `ToyProblem.sequences`."""
    code = jnp.zeros(tokens.shape[:1], jnp.int32)
    for t in range(tokens.shape[1]):
        code = code * vocab_size + tokens[:, t]
    return code


def _previous_tokens(tokens: Array, vocab_size: int) -> Array:
    """[B, L] the token before each position; V stands for "start"."""
    start = jnp.full(tokens.shape[:1] + (1,), vocab_size, tokens.dtype)
    return jnp.concatenate([start, tokens[:, :-1]], axis=1)


def _tabular_logp(table: Array, tokens: Array) -> Array:
    logits = table[prefix_index(tokens, table.shape[1])]
    return _gather_logp(logits, tokens)


def _gather_logp(logits: Array, tokens: Array) -> Array:
    """Σ_t log softmax(logits_t)[x_t] without a full log-softmax: [B, L, V] → [B]."""
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(chosen - jax.nn.logsumexp(logits, axis=-1), axis=-1)


# --- policy families ---------------------------------------------------------

def init_policy(problem: ToyProblem, family: str):
    """Parameters with π = a exactly."""
    if family == "tabular":
        return {"logits": problem.base_logits}
    if family == "shared":
        v = problem.vocab_size
        return {"bias": jnp.zeros((v + 1, v), jnp.float32)}
    raise ValueError(f"unknown policy family={family!r}; choose one of {FAMILIES}")


def _next_logits(problem: ToyProblem, family: str, params, prefix: Array, previous: Array) -> Array:
    if family == "tabular":
        return params["logits"][prefix]
    return problem.base_logits[prefix] + params["bias"][previous]


def token_logp(problem: ToyProblem, family: str, params, tokens: Array) -> Array:
    """log π(x_t | x_<t) for tokens [B, L] → [B, L] (float32, differentiable in params)."""
    v = problem.vocab_size
    logits = _next_logits(problem, family, params, prefix_index(tokens, v), _previous_tokens(tokens, v))
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def sequence_logp(problem: ToyProblem, family: str, params, tokens: Array) -> Array:
    """log π(x) for tokens [B, L] → [B] (float32, differentiable in params)."""
    return jnp.sum(token_logp(problem, family, params, tokens), axis=-1)


def all_logp(problem: ToyProblem, family: str, params) -> Array:
    """log π over the whole support, [S]."""
    return sequence_logp(problem, family, params, problem.sequences)


def sample(problem: ToyProblem, family: str, params, key: Array, num_samples: int):
    """Ancestral sampling of [N, L] tokens; also returns their log-probs [N]."""
    v, seq_len = problem.vocab_size, problem.seq_len
    tokens = jnp.zeros((num_samples, seq_len), jnp.int32)
    code = jnp.zeros((num_samples,), jnp.int32)
    previous = jnp.full((num_samples,), v, jnp.int32)
    logp = jnp.zeros((num_samples,), jnp.float32)
    offset = 0
    for t, step_key in enumerate(jax.random.split(key, seq_len)):
        logits = _next_logits(problem, family, params, offset + code, previous)
        token = jax.random.categorical(step_key, logits)
        logp = logp + jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        tokens = tokens.at[:, t].set(token)
        code, previous, offset = code * v + token, token, offset + v**t
    return tokens, logp


# --- targets ----------------------------------------------------------------

def _count(sequences: Array, token: int) -> Array:
    return jnp.sum(sequences == token, axis=1)


def _finish(problem: ToyProblem, log_potential: Array, score: Array) -> ToyTarget:
    log_P = problem.base_logp + log_potential
    log_Z = jax.nn.logsumexp(log_P)
    return ToyTarget(log_potential=log_potential, score=score.astype(jnp.float32), log_p=log_P - log_Z, log_Z=log_Z)


def pointwise_target(problem: ToyProblem, min_count: int = 2, log_floor: float = -math.inf) -> ToyTarget:
    """b(x) = 1[token 0 occurs ≥ min_count times]; log_floor = log ε softens b = 0 to ε."""
    b = (_count(problem.sequences, 0) >= min_count).astype(jnp.float32)
    return _finish(problem, targets.pointwise_log_potential(b, log_floor), b)


def rlhf_target(problem: ToyProblem, beta: float = 0.2) -> ToyTarget:
    """r(x) = fraction of tokens equal to 1 (in [0, 1]); P = a·exp(r/β)."""
    reward = _count(problem.sequences, 1) / problem.seq_len
    return _finish(problem, targets.rlhf_log_potential(reward, beta), reward)


def distributional_target(problem: ToyProblem, mu_bar: float = 0.5, min_count: int = 3) -> tuple[ToyTarget, targets.LambdaFit]:
    """φ(x) = 1[token 2 occurs ≥ min_count times]; λ fitted exactly (enumeration) so E_p[φ] = μ̄."""
    phi = (_count(problem.sequences, 2) >= min_count).astype(jnp.float32)[:, None]
    fit = targets.fit_lambda(phi, jnp.array([mu_bar]), log_weights=problem.base_logp)
    return _finish(problem, targets.distributional_log_potential(phi, fit.lam), phi[:, 0]), fit


def make_target(problem: ToyProblem, name: str, *, beta: float = 0.2, mu_bar: float = 0.5,
                log_floor: float = -math.inf) -> ToyTarget:
    """A target by name (one of `TARGETS`), with the module's default scorers."""
    if name == "pointwise":
        return pointwise_target(problem, log_floor=log_floor)
    if name == "rlhf":
        return rlhf_target(problem, beta=beta)
    if name == "distributional":
        return distributional_target(problem, mu_bar=mu_bar)[0]
    raise ValueError(f"unknown toy target={name!r}; choose one of {TARGETS}")


def score(problem: ToyProblem, target: ToyTarget, tokens: Array) -> tuple[Array, Array]:
    """What a scorer would compute for sampled tokens [B, L]: (sequence ids [B], log P [B])."""
    ids = sequence_id(tokens, problem.vocab_size)
    return ids, problem.base_logp[ids] + target.log_potential[ids]


# --- exact metrics ------------------------------------------------------------

METRICS = ("kl_p_pi", "kl_pi_p", "js", "tv", "alignment", "kl_pi_a", "entropy")


def exact_metrics(problem: ToyProblem, target: ToyTarget, policy_logp: Array) -> dict:
    """Exact metrics of π (given as log π over the support, [S]) by enumeration.

    kl_p_pi = KL(p‖π) (GDC's objective), kl_pi_p = KL(π‖p) (RLHF's), js, tv,
    alignment = E_π[score] (E_π[b], E_π[r] or E_π[φ]), kl_pi_a = KL(π‖a),
    entropy = H(π) in nats.
    """
    pi = jnp.exp(policy_logp)
    return dict(
        kl_p_pi=divergences.exact_divergence("fkl", policy_logp, target.log_p),
        kl_pi_p=divergences.exact_divergence("rkl", policy_logp, target.log_p),
        js=divergences.exact_divergence("js", policy_logp, target.log_p),
        tv=divergences.exact_divergence("tv", policy_logp, target.log_p),
        alignment=jnp.sum(pi * target.score),
        kl_pi_a=divergences.exact_divergence("rkl", policy_logp, problem.base_logp),
        entropy=-jnp.sum(pi * policy_logp),
    )
