"""Jit-compiled ancestral sampling with a fixed-size KV cache.

A `Sampler` is a static object (the model's graphdef, max new tokens, top-k,
prompt length buckets) around one jitted function of arrays: prefill the
left-padded prompt, then one `lax.while_loop` that decodes a token per step for
the whole batch and stops when every sequence has emitted EOS or the budget is
spent. Temperature and top-p are arrays, so changing them does not recompile;
prompts are left-padded to the smallest bucket that fits, so a new prompt of a
known bucket does not recompile either.

The returned `logp` are the log-probabilities of the distribution actually
sampled from (after temperature/top-k/top-p): the proposal q of f-DPG. With
temperature 1 and no truncation they equal the model's own log-probs.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdrl.models.llama import KVCache, forward

Array = jax.Array

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


class SampleOutput(NamedTuple):
    tokens: Array  # [B, N] generated ids (pad after EOS)
    mask: Array  # [B, N] bool: real generated tokens, EOS included
    logp: Array  # [B, N] float32 sampler log-probs, 0 where masked


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, buckets: Sequence[int] = DEFAULT_BUCKETS):
    """Left-pads token lists to the smallest bucket ≥ the longest prompt.

    Returns (tokens [B, P] int32, valid [B, P] bool) as numpy arrays.
    """
    if not prompts:
        raise ValueError("pad_prompts needs at least one prompt")
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise ValueError("every prompt is empty: give at least one token (e.g. BOS or a chat header)")
    fitting = [b for b in sorted(buckets) if b >= longest]
    if not fitting:
        raise ValueError(f"prompt of {longest} tokens is longer than the largest bucket {max(buckets)}")
    size = fitting[0]
    tokens = np.full((len(prompts), size), pad_id, np.int32)
    valid = np.zeros((len(prompts), size), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, size - len(p):] = p
            valid[i, size - len(p):] = True
    return tokens, valid


def sample_token(logits: Array, key: Array, temperature: Array, top_k: int, top_p: Array):
    """One token per row from logits [B, V] → (token [B], log q(token) [B]).

    temperature ≤ 1e-6 means greedy (log q = 0). top_k = 0 and top_p = 1 are off.
    """
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 1e-6
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)

    def nucleus(x):
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        return jnp.where(keep, x, -jnp.inf)

    scaled = jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, scaled)
    log_q = jax.nn.log_softmax(scaled, axis=-1)
    # Inverse-CDF sampling: one uniform per row instead of one Gumbel per vocabulary
    # entry (random bits for [B, V] per step dominate categorical() on CPU).
    cdf = jnp.cumsum(jnp.exp(log_q), axis=-1)
    uniform = jax.random.uniform(key, (logits.shape[0], 1)) * cdf[:, -1:]
    sampled = jnp.minimum(jnp.sum(cdf < uniform, axis=-1), logits.shape[-1] - 1)
    # Never land on a token of probability 0 through float rounding at a step of the cdf.
    sampled = jnp.where(jnp.take_along_axis(log_q, sampled[:, None], -1)[:, 0] == -jnp.inf,
                        jnp.argmax(log_q, axis=-1), sampled)
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled)
    token_logp = jnp.where(greedy, 0.0, jnp.take_along_axis(log_q, token[:, None], axis=-1)[:, 0])
    return token.astype(jnp.int32), token_logp


class Sampler:
    """Samples completions from a model given as (graphdef, params).

        sampler = Sampler(graphdef, config, max_new_tokens=32, eos_id=2, pad_id=2)
        prompt, valid = sampler.pad(prompt_ids)
        out = sampler(params, prompt, valid, key, temperature=1.0)
    """

    def __init__(self, graphdef, model_config, *, max_new_tokens: int, eos_id: int, pad_id: int,
                 top_k: int = 0, buckets: Sequence[int] = DEFAULT_BUCKETS, out_sharding=None):
        """out_sharding: optional sharding of the [B, N] outputs (fdrl.sharding.batch_sharding):
        on a mesh the batch stays split over the data axes from the prompt to the update."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if top_k < 0 or top_k > model_config.vocab_size:
            raise ValueError(f"top_k must be in [0, vocab_size={model_config.vocab_size}], got {top_k}")
        self.graphdef, self.model_config = graphdef, model_config
        self.max_new_tokens, self.eos_id, self.pad_id, self.top_k = max_new_tokens, eos_id, pad_id, top_k
        self.buckets = tuple(sorted(buckets))
        self.trace_count = 0  # how many times the jitted function was traced (tests)
        self._jitted = jax.jit(self._sample, out_shardings=None if out_sharding is None else
                               SampleOutput(out_sharding, out_sharding, out_sharding))

    def pad(self, prompts: Sequence[Sequence[int]]):
        return pad_prompts(prompts, self.pad_id, self.buckets)

    def __call__(self, params, prompt: Array, prompt_valid: Array, key: Array, temperature: float = 1.0,
                 top_p: float = 1.0) -> SampleOutput:
        if prompt.shape != prompt_valid.shape or prompt.ndim != 2:
            raise ValueError(f"prompt {prompt.shape} and prompt_valid {prompt_valid.shape} must both be [B, P]")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return self._jitted(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_valid, bool), key,
                            jnp.float32(temperature), jnp.float32(top_p))

    def _sample(self, params, prompt, prompt_valid, key, temperature, top_p) -> SampleOutput:
        self.trace_count += 1
        batch, prompt_len = prompt.shape
        steps = self.max_new_tokens
        cache = KVCache.init(self.model_config, batch, prompt_len + steps)
        out = forward(self.graphdef, params, prompt, prompt_valid, cache, 0, last_only=True)

        def cond(carry):
            t, _, _, _, _, _, done, _ = carry
            return (t < steps) & ~jnp.all(done)

        def body(carry):
            t, cache, logits, tokens, mask, logp, done, key = carry
            key, sub = jax.random.split(key)
            token, token_logp = sample_token(logits, sub, temperature, self.top_k, top_p)
            real = ~done
            token = jnp.where(real, token, self.pad_id)
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
            mask = jax.lax.dynamic_update_slice(mask, real[:, None], (0, t))
            logp = jax.lax.dynamic_update_slice(logp, jnp.where(real, token_logp, 0.0)[:, None], (0, t))
            done = done | (token == self.eos_id)
            step = forward(self.graphdef, params, token[:, None], real[:, None], cache, prompt_len + t)
            return t + 1, step.cache, step.logits[:, 0], tokens, mask, logp, done, key

        carry = (jnp.int32(0), out.cache, out.logits[:, -1],
                 jnp.full((batch, steps), self.pad_id, jnp.int32), jnp.zeros((batch, steps), bool),
                 jnp.zeros((batch, steps), jnp.float32), jnp.zeros((batch,), bool), key)
        _, _, _, tokens, mask, logp, _, _ = jax.lax.while_loop(cond, body, carry)
        return SampleOutput(tokens=tokens, mask=mask, logp=logp)
