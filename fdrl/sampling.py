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

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fdrl.models.llama import KVCache, forward

Array = jax.Array

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


class SampleOutput(NamedTuple):
    tokens: Array  # [B, N] generated ids (pad after EOS)
    mask: Array  # [B, N] bool: real generated tokens, EOS included
    logp: Array  # [B, N] float32 sampler log-probs, 0 where masked
    # [B, L + 1, P + N − 1, D] with keep_states: every layer's input at every slot the model
    # read, and the last layer's output (logprobs.continuation_logp_from_states); else None.
    states: Optional[Array] = None


def states_shape(model_config, batch: int, prompt_len: int, max_new_tokens: int) -> jax.ShapeDtypeStruct:
    """SampleOutput.states of a sampler with keep_states, abstract: [B, L + 1, P + N − 1, D]
    (the slots the model reads: the prompt, then every new token but the last)."""
    shape = (batch, model_config.num_layers + 1, prompt_len + max_new_tokens - 1, model_config.hidden_dim)
    return jax.ShapeDtypeStruct(shape, jnp.dtype(model_config.compute_dtype))


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


CDF_BLOCK = 256  # vocabulary entries per block of the two-level inverse-CDF search


def sample_token(logits: Array, key: Array, temperature: Array, top_k: int, top_p: Array):
    """One token per row from logits [B, V] → (token [B], log q(token) [B]).

    temperature ≤ 1e-6 means greedy (log q = 0). top_k = 0 and top_p = 1 are off.
    """
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 1e-6

    def sample(logits):
        scaled = logits / temperature
        if top_k:
            kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        scaled = jax.lax.cond(top_p < 1.0, functools.partial(_nucleus, top_p=top_p), lambda x: x, scaled)
        return _inverse_cdf(scaled, key)

    def argmax(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1], jnp.float32)

    # A cond, not a where: only one branch runs (an argmax over V costs as much as a decode layer).
    return jax.lax.cond(greedy, argmax, sample, logits)


def _nucleus(x: Array, top_p: Array) -> Array:
    """Keeps the smallest set of top tokens whose mass reaches top_p; the rest get -inf."""
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, x, -jnp.inf)


def _inverse_cdf(logits: Array, key: Array):
    """Draws from softmax(logits) [B, V] (−inf = excluded) → (token [B] int32, log-prob [B]).

    One uniform per row (random bits for all of [B, V], as Gumbel-max needs, dominate on
    CPU), searched in two levels: the cumulative mass of blocks of CDF_BLOCK entries, then
    the cumulative mass inside the chosen block. A cumsum over the whole vocabulary costs
    ~10× the rest of the step here. The log-prob is logits[token] − logsumexp(logits).
    """
    batch, vocab = logits.shape
    num_blocks = -(-vocab // CDF_BLOCK)
    top = jnp.max(logits, axis=-1, keepdims=True)
    mass = jnp.exp(logits - top)  # [B, V], in (0, 1]; 0 where excluded
    blocks = jnp.pad(mass, ((0, 0), (0, num_blocks * CDF_BLOCK - vocab))).reshape(batch, num_blocks, CDF_BLOCK)
    block_cdf = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, nb]
    total = block_cdf[:, -1]
    u = jax.random.uniform(key, (batch,)) * total
    block = jnp.minimum(jnp.sum(block_cdf <= u[:, None], axis=-1), num_blocks - 1)
    within = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [B, CDF_BLOCK]
    within_cdf = jnp.cumsum(within, axis=-1)
    # u's offset into its block; the block's own cumsum need not end exactly where block_cdf
    # says (rounding), so the index is clamped to the block and the guard below catches the rest.
    start = jnp.take_along_axis(block_cdf, block[:, None], axis=1)[:, 0] - within_cdf[:, -1]
    offset = jnp.minimum(jnp.sum(within_cdf <= (u - start)[:, None], axis=-1), CDF_BLOCK - 1)
    token = jnp.minimum(block * CDF_BLOCK + offset, vocab - 1)
    chosen = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    # Rounding at a block edge can land on an excluded (mass-0) entry: take the mode instead.
    # Rare, so behind a cond: the argmax runs only when some row needs it.
    token, chosen = jax.lax.cond(jnp.any(chosen == -jnp.inf),
                                 lambda: (jnp.where(chosen == -jnp.inf, jnp.argmax(logits, -1), token),
                                          jnp.where(chosen == -jnp.inf, top[:, 0], chosen)),
                                 lambda: (token, chosen))
    return token.astype(jnp.int32), chosen - top[:, 0] - jnp.log(total)


def auto_column_blocks(batch: int) -> int:
    """Column blocks of the layers' lone products (q, o, down) for a sampler of `batch` rows:
    2 on CPU from 2 to 32 rows, else 1.

    XLA's CPU runtime runs each of these small products on one thread and independent ones
    side by side: q next to the narrower k and v, o and down alone, so one core idles. In
    two halves both work. SmolLM2, 32 new tokens, float32, 2 cores (an Intel Xeon with AMX;
    medians of 5 calls, two alternating runs each): tokens/s 77–81 → 85–87 at batch 4,
    127–130 → 135–138 at 8, 207–208 → 229 at 16, 290–293 → 310–318 at 32. No gain at 48
    (339–350 → 344–356) or 64 (422 → 419, one run), and a loss at batch 1 (29–32 → 27–29),
    where XLA makes the products matrix-vector ones of its own, not YNNPACK's.
    """
    return 2 if 2 <= batch <= 32 and jax.default_backend() == "cpu" else 1


# XLA's CPU scheduler that orders a computation for the least memory: `Sampler` compiles
# calls that transpose their layers with it (`auto_transposed_layers`), and the trainer its
# update (`lm_step.update_compiler_options`).
CPU_LOW_MEMORY_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
_TRANSPOSED_LAYERS_MAX_ROWS = 16


def auto_transposed_layers(batch: int, compute_dtype) -> bool:
    """Whether a sampler call of `batch` rows without kept layers makes its per-layer
    weights transposed (`Llama.unstack_layers(transposed=True)`): on CPU in float32 at
    2 to 16 rows, else False.

    Transposed weights make a decode step column-major (`llama._layer_columns`), worth the
    copy's pass over the weights at few rows only. SmolLM2 per call (the trainer's
    sampling), 32 new tokens, 2 cores of an AMD EPYC, alternating in one process: tokens/s
    1.15× at batch 8, 1.20–1.24× at 16, 1.11–1.13× at 32, but 0.89× at 64 and 0.975× at 1.
    Such calls compile with XLA's memory-minimising scheduler (`CPU_LOW_MEMORY_OPTIONS`):
    its default order makes every layer's transposed copy before the prefill, beside the
    slices the prefill reads, 0.89 GB of temporaries at batch 32 against 0.67 GB with plain
    slices; ordered for memory, 0.56 GB. Yet with 32 rows transposing too, `bench_step`'s
    process peaked at 3.04 GB (2.94 and 3.00 GB without, two runs), over its 3 GB target,
    the transposing compile leaving more resident: so up to 16 rows, below the trainer's
    batch of 32 there.
    """
    return (2 <= batch <= _TRANSPOSED_LAYERS_MAX_ROWS and jax.default_backend() == "cpu"
            and jnp.dtype(compute_dtype) == jnp.float32)


class Sampler:
    """Samples completions from a model given as (graphdef, params).

        sampler = Sampler(graphdef, config, max_new_tokens=32, eos_id=2, pad_id=2)
        prompt, valid = sampler.pad(prompt_ids)
        out = sampler(params, prompt, valid, key, temperature=1.0)
    """

    def __init__(self, graphdef, model_config, *, max_new_tokens: int, eos_id: int, pad_id: int,
                 top_k: int = 0, buckets: Sequence[int] = DEFAULT_BUCKETS, out_sharding=None,
                 keep_states: bool = False, states_sharding=None, column_blocks: Optional[int] = None,
                 transposed_layers: Optional[bool] = None):
        """out_sharding: optional sharding of the [B, N] outputs (fdrl.sharding.batch_sharding):
        on a mesh the batch stays split over the data axes from the prompt to the update.
        keep_states: also return the layers' inputs (SampleOutput.states, sharded by
        `states_sharding`), so that an update can differentiate the policy's log-probs
        without a forward pass (logprobs.continuation_logp_from_states).
        column_blocks: the layers' lone products in that many column blocks
        (`Llama.unstack_layers`); None = `auto_column_blocks` of the batch. The samples are
        the same up to float rounding.
        transposed_layers: whether a call without kept `layers` makes them transposed (a
        faster layout for decoding's few rows); None = `auto_transposed_layers` of the batch.
        The samples are the same up to float rounding."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if column_blocks is not None and column_blocks < 1:
            raise ValueError(f"column_blocks must be >= 1 or None (automatic), got {column_blocks}")
        if top_k < 0 or top_k > model_config.vocab_size:
            raise ValueError(f"top_k must be in [0, vocab_size={model_config.vocab_size}], got {top_k}")
        self.graphdef, self.model_config = graphdef, model_config
        self.max_new_tokens, self.eos_id, self.pad_id, self.top_k = max_new_tokens, eos_id, pad_id, top_k
        self.buckets = tuple(sorted(buckets))
        self.keep_states = keep_states
        self.column_blocks = column_blocks
        self.transposed_layers = transposed_layers
        self.trace_count = 0  # how many times the jitted function was traced (tests)
        out_shardings = None if out_sharding is None else SampleOutput(
            out_sharding, out_sharding, out_sharding, states_sharding if keep_states else None)
        self._jitted = jax.jit(self._sample, out_shardings=out_shardings)
        # Calls that transpose their layers: ordered for memory on CPU (auto_transposed_layers).
        self._jitted_transposing = jax.jit(
            self._sample, out_shardings=out_shardings,
            compiler_options=CPU_LOW_MEMORY_OPTIONS if jax.default_backend() == "cpu" else None)
        self._decode_layers = jax.jit(lambda params, blocks, transposed: nnx.merge(graphdef, params).unstack_layers(
            blocks, transposed), static_argnums=(1, 2))

    def pad(self, prompts: Sequence[Sequence[int]]):
        return pad_prompts(prompts, self.pad_id, self.buckets)

    def decode_layers(self, params, batch_size: int, transposed: Optional[bool] = None) -> list:
        """The per-layer weights for calls of `batch_size` rows with these params, made once:
        pass them to `__call__(..., layers=)` (`Llama.unstack_layers` with this sampler's
        column blocks).

        A call without them slices each layer's weights out of the stacked [L, ...] arrays
        (and dequantises a quantised model) at its start, which repeats work when the
        params stay the same over many calls (evaluation, a benchmark). Kept weights can
        also take a layout that is faster to decode with but too slow to make per call:
        transposed (TransposedWeight), by default on CPU in float32. The samples are the
        same up to float rounding. The cost is a copy of the layer weights while they are
        kept (0.43 GB for SmolLM2 in float32)."""
        blocks = auto_column_blocks(batch_size) if self.column_blocks is None else self.column_blocks
        if transposed is None:
            transposed = jax.default_backend() == "cpu" and jnp.dtype(self.model_config.compute_dtype) == jnp.float32
        return self._decode_layers(params, blocks, bool(transposed))

    def __call__(self, params, prompt: Array, prompt_valid: Array, key: Array, temperature: float = 1.0,
                 top_p: float = 1.0, layers: Optional[list] = None) -> SampleOutput:
        """layers: `decode_layers(params, ...)` of these same params, or None (made in the call)."""
        self._check_layers(layers)
        if prompt.shape != prompt_valid.shape or prompt.ndim != 2:
            raise ValueError(f"prompt {prompt.shape} and prompt_valid {prompt_valid.shape} must both be [B, P]")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return self.jitted(prompt.shape[0], layers)(*self._args(params, prompt, prompt_valid, key, temperature,
                                                                top_p), layers)

    def lower(self, params, prompt: Array, prompt_valid: Array, key: Array, temperature: float = 1.0,
              top_p: float = 1.0, layers: Optional[list] = None):
        """The jitted sampler lowered for these arguments, as `__call__` passes them; params
        may be abstract (ShapeDtypeStructs). `.compile()` it ahead of time: a later call with
        arrays of the same shapes and shardings reuses the executable."""
        self._check_layers(layers)
        return self.jitted(prompt.shape[0], layers).lower(
            *self._args(params, prompt, prompt_valid, key, temperature, top_p), layers)

    def jitted(self, batch: int, layers=None):
        """The jitted function that calls of `batch` rows run (with `layers` as given), taking
        `(params, prompt, prompt_valid, key, temperature, top_p, layers)` (a benchmark's handle)."""
        return self._jitted_transposing if layers is None and self._transposes(batch) else self._jitted

    def _transposes(self, batch: int) -> bool:
        if self.transposed_layers is None:
            return auto_transposed_layers(batch, self.model_config.compute_dtype)
        return self.transposed_layers

    def _check_layers(self, layers):
        if layers is not None and (not isinstance(layers, (list, tuple))
                                   or len(layers) != self.model_config.num_layers):
            raise ValueError(f"layers must be decode_layers(params, batch_size): a list of "
                             f"{self.model_config.num_layers} per-layer tuples, got {type(layers).__name__}"
                             + (f" of {len(layers)}" if isinstance(layers, (list, tuple)) else ""))

    @staticmethod
    def _args(params, prompt, prompt_valid, key, temperature, top_p):
        return (params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_valid, bool), key,
                jnp.float32(temperature), jnp.float32(top_p))

    def _sample(self, params, prompt, prompt_valid, key, temperature, top_p, layers=None) -> SampleOutput:
        self.trace_count += 1
        batch, prompt_len = prompt.shape
        steps = self.max_new_tokens
        cache = KVCache.init(self.model_config, batch, prompt_len + steps)
        # Each layer's weights sliced out once per generation, not once per token (see `layers`).
        if layers is None:
            blocks = auto_column_blocks(batch) if self.column_blocks is None else self.column_blocks
            layers = nnx.merge(self.graphdef, params).unstack_layers(blocks, self._transposes(batch))
        out = forward(self.graphdef, params, prompt, prompt_valid, cache, 0, last_only=True, layers=layers,
                      with_states=self.keep_states)
        states = None
        if self.keep_states:  # slots the model reads: the prompt, then every new token but the last
            states = jnp.pad(out.states, ((0, 0), (0, 0), (0, steps - 1), (0, 0)))
            expected = states_shape(self.model_config, batch, prompt_len, steps)
            assert (states.shape, states.dtype) == (expected.shape, expected.dtype), (states.shape, expected)

        def emit(t, logits, tokens, mask, logp, done, key):
            """Draws token t of every unfinished row from logits [B, V] and records it."""
            key, sub = jax.random.split(key)
            token, token_logp = sample_token(logits, sub, temperature, self.top_k, top_p)
            real = ~done
            token = jnp.where(real, token, self.pad_id)
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
            mask = jax.lax.dynamic_update_slice(mask, real[:, None], (0, t))
            logp = jax.lax.dynamic_update_slice(logp, jnp.where(real, token_logp, 0.0)[:, None], (0, t))
            return token, real, tokens, mask, logp, done | (token == self.eos_id), key

        def cond(carry):
            t, _, _, _, _, _, done, _, _ = carry
            return (t < steps - 1) & ~jnp.all(done)

        def body(carry):
            t, cache, logits, tokens, mask, logp, done, key, states = carry
            token, real, tokens, mask, logp, done, key = emit(t, logits, tokens, mask, logp, done, key)
            step = forward(self.graphdef, params, token[:, None], real[:, None], cache, prompt_len + t, layers=layers,
                           with_states=self.keep_states)
            if self.keep_states:
                states = jax.lax.dynamic_update_slice(states, step.states, (0, 0, prompt_len + t, 0))
            return t + 1, step.cache, step.logits[:, 0], tokens, mask, logp, done, key, states

        carry = (jnp.int32(0), out.cache, out.logits[:, -1],
                 jnp.full((batch, steps), self.pad_id, jnp.int32), jnp.zeros((batch, steps), bool),
                 jnp.zeros((batch, steps), jnp.float32), jnp.zeros((batch,), bool), key, states)
        t, _, logits, tokens, mask, logp, done, key, states = jax.lax.while_loop(cond, body, carry)
        # The last token needs no forward pass after it: drawn outside the loop. When every
        # row finished early this records nothing (rows that are done stay pad / masked).
        _, _, tokens, mask, logp, _, _ = emit(t, logits, tokens, mask, logp, done, key)
        return SampleOutput(tokens=tokens, mask=mask, logp=logp, states=states)
