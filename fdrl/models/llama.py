"""A Llama-family decoder in Flax NNX: RMSNorm, rotary embeddings (rotate-half),
grouped-query attention, SwiGLU MLP, tied or untied output, optional value head.

The layers' parameters are stacked along a leading "layers" axis and applied
with `lax.scan`, so compile time does not grow with depth. Every parameter
carries logical axis names (`out_sharding` metadata) for fdrl.sharding.

One forward serves teacher forcing and cached decoding. Positions are *slots*:
a batch is left-padded, `valid` marks real tokens, a query at slot i sees keys
at slots j ≤ i that are valid, and rotary positions count valid tokens only, so
padding changes nothing. With a cache, the new tokens are written at slots
[index, index + T) of a fixed-size buffer.

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)          # plain jax.jit over params
    out = forward(graphdef, params, tokens, valid)  # out.logits [B, T, V]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# A decode step of at most this many rows makes its logits as embed [V, D] @ hidden [D, B]
# on CPU (`_decode_logits`).
_COLUMN_LOGITS_MAX_ROWS = 32


def _decode_logits(hidden: Array, embed: Array) -> Array:
    """A decode step's tied output projection: hidden [B, 1, D] against embed [V, D] → float32
    logits [B, 1, V].

    On CPU as embed @ hidden [D, B], transposed after: XLA's CPU kernels repack a product's
    right operand, and hidden @ embedᵀ repacks the whole [V, D] embedding every decoded
    token. SmolLM2 (V = 49152, D = 576) on 2 cores of an AMD EPYC (ad hoc, medians of 5
    alternating rounds): the product alone 10.0 against 16.6 ms at 16 rows, 15.7 against
    21.2 at 32, but 31.5 against 25.9 at 64 (hence `_COLUMN_LOGITS_MAX_ROWS`); the sampler
    with kept layers 1.05-1.10x the tokens/s at batch 16, 1.04-1.08x at 32 (one run of three
    0.93x, as the host slowed). The barrier keeps XLA from folding the transpose back into
    the product."""
    def columns(hidden, embed):
        f32 = jnp.float32  # as _einsum_f32 on CPU: float32 copies of low-precision operands
        cols = embed.astype(f32) @ hidden[:, 0].T.astype(f32)  # [V, B]
        return jax.lax.optimization_barrier(cols).T[:, None]

    return jax.lax.platform_dependent(hidden, embed, cpu=columns, default=lambda h, e: _logits(h, e.T))


def _einsum_f32(spec: str, a: Array, b: Array) -> Array:
    """jnp.einsum(spec, a, b) with float32 results whatever the operands' dtype.

    On accelerators low-precision operands stay as they are, accumulating in float32.
    XLA's CPU runtime has no BF16 x BF16 -> F32 kernel for some of the layouts it gives
    these products (the attention scores of a prefill, say: "Unsupported element type for
    DotThunk::Execute"), so on CPU the operands are upcast first, which is how that
    backend runs bfloat16 products anyway.
    """
    f32 = jnp.float32
    if a.dtype == f32 and b.dtype == f32:
        return jnp.einsum(spec, a, b)
    return jax.lax.platform_dependent(
        a, b, cpu=lambda a, b: jnp.einsum(spec, a.astype(f32), b.astype(f32)),
        default=lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=f32))


def _logits(hidden: Array, out_w: Array) -> Array:
    """The output projection: hidden [..., D] @ out_w [D, V] → float32 logits [..., V]."""
    return _einsum_f32("...d,dv->...v", hidden, out_w)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w_t"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TransposedWeight:
    """A layer weight w [D, F] kept as its transpose w_t [F, D], row-major
    (`Llama.unstack_layers(transposed=True)`). A decode step's products are then w_t @ h
    with activations h [D, B] (`_layer_columns`); a prefill's contract the minor axes of
    x [B·T, D] and w_t. For decoding's few rows, XLA's CPU library kernels run either faster
    than x @ w: SmolLM2's decode products, 30 chained layers at 16 rows on 2 cores of an Intel
    Xeon, 37–38 against 40–41 ms per token contracting minor axes (an ad-hoc probe), and
    w_t @ h faster again (`_layer_columns`). Making the copy costs more than that within one
    generation, so only weights kept across calls use it (`Sampler.decode_layers`)."""
    w_t: Array

    def astype(self, dtype) -> "TransposedWeight":
        return TransposedWeight(self.w_t.astype(dtype))


def _dot_nt(x: Array, w_t: Array, preferred_element_type=None) -> Array:
    """x [..., K] · w_t [N, K]ᵀ → [..., N]."""
    return jax.lax.dot_general(x, w_t, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=preferred_element_type)


def _dot_f32(x: Array, w) -> Array:
    """x [..., K] @ w [K, N] (or a TransposedWeight) with float32 results (a low-precision
    product should get row-major operands: `_transposed`, `_output_operands`)."""
    if isinstance(w, TransposedWeight):
        return _dot_nt(x, w.w_t, None if x.dtype == w.w_t.dtype == jnp.float32 else jnp.float32)
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return x @ w
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _rounded_matmul(x: Array, w: Array) -> Array:
    """x @ w in x's dtype, a low-precision product made with float32 results and rounded
    once; no backward of its own (`_matmul` is the differentiable face; `_swiglu` writes its
    own). Unlike `_einsum_f32` it keeps preferred_element_type on CPU: these plain 2-D
    products go to XLA's library kernels, which take BF16 x BF16 -> F32 (bfloat16 trainer
    steps on one device and on a 2 x 2 x 2 mesh in tests/test_sharding.py)."""
    return _dot_f32(x, w).astype(x.dtype)


def _transposed(x: Array) -> Array:
    """x.T of a 2-D operand of a product (the backward passes' products, the output
    projection of an update).

    float32: plain x.T. Low precision on CPU: a row-major copy made by a gather. XLA on CPU
    keeps a bfloat16 product in bfloat16 (AMX where the CPU has it) only when both operands
    are row-major and contract as [M, K] × [K, N]. A transpose made any other way (even
    behind an optimization_barrier or inside a lax.cond) ends up folded into the product or
    laid out column-major, and XLA then multiplies float32 copies of the operands instead:
    ~200 against ~900 GFLOP/s for SmolLM2's layer shapes on an AMX host. A gather that
    permutes the elements is neither. (On a mesh of CPU devices the gather collects a
    sharded operand whole: correct, not fast.) Other platforms: plain x.T.
    """
    if x.dtype == jnp.float32:
        return x.T

    def gathered(x):
        rows, cols = x.shape
        index = jnp.arange(cols, dtype=jnp.int32)[:, None] + cols * jnp.arange(rows, dtype=jnp.int32)[None, :]
        return x.reshape(-1).at[index].get(mode="promise_in_bounds", unique_indices=True)

    return jax.lax.platform_dependent(x, cpu=gathered, default=lambda x: x.T)


def _matmul(x: Array, w) -> Array:
    """x [..., D] @ w [D, F] in x's dtype; low-precision operands through `_low_matmul`.
    A TransposedWeight (cached decoding, never differentiated) through `_rounded_matmul`."""
    if isinstance(w, TransposedWeight):
        return _rounded_matmul(x, w)
    return x @ w if x.dtype == jnp.float32 else _low_matmul(x, w)


@jax.custom_vjp
def _low_matmul(x: Array, w: Array) -> Array:
    """x @ w for bfloat16 operands, multiplied with float32 results and rounded once. XLA
    on CPU runs a bfloat16 -> bfloat16 product as a float32 dot of converted copies; asked
    for a float32 result it keeps the operands bfloat16 (AMX on Intel CPUs that have it).
    The backward pass is autodiff's for x @ w, its products likewise (autodiff's transpose
    of a float32-result product would multiply a float32 cotangent by bfloat16 weights)."""
    return _rounded_matmul(x, w)


def _low_matmul_fwd(x, w):
    return _rounded_matmul(x, w), (x, w)


def _low_matmul_bwd(residuals, g):
    x, w = residuals
    d_w = _rounded_matmul(_transposed(x.reshape(-1, x.shape[-1])), g.reshape(-1, g.shape[-1]))
    return _rounded_matmul(g, _transposed(w)), d_w.astype(w.dtype)


_low_matmul.defvjp(_low_matmul_fwd, _low_matmul_bwd)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    hidden_dim: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    ffn_dim: int = 1536
    rope_theta: float = 100_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    value_head: bool = False
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # activations; logits and log-probs are always float32
    unroll_layers: bool = False  # unroll the layer scan: XLA's cost analysis then counts every layer
    # Backward-pass memory of the layer scan (REMAT_POLICIES): "none" keeps every activation,
    # "full" keeps only each layer's input and recomputes the layer (+1 forward of FLOPs),
    # "dots" keeps the weight matmuls' outputs and recomputes the cheap rest. True = "full".
    remat: bool | str = False
    logits_chunk: int = 1024  # teacher forcing makes logits for this many positions at a time (0 = all at once)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)} (or a bool)")
        if self.logits_chunk < 0:
            raise ValueError(f"logits_chunk must be >= 0 (0 = no chunking), got {self.logits_chunk}")

    @classmethod
    def smollm2_135m(cls, **overrides) -> "LlamaConfig":
        """SmolLM2-135M(-Instruct): 30 layers, hidden 576, 9 heads / 3 KV heads."""
        return cls(**overrides)

    @classmethod
    def llama_1b(cls, **overrides) -> "LlamaConfig":
        """Llama-3.2-1B shapes (1.24B parameters, tied embeddings): for compile-only tests."""
        base = dict(vocab_size=128256, hidden_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                    ffn_dim=8192, rope_theta=500_000.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A random model for tests: 2 layers, hidden 32, 4 heads / 2 KV heads."""
        base = dict(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    ffn_dim=64, rope_theta=10_000.0)
        base.update(overrides)
        return cls(**base)

    def num_params(self) -> int:
        d, f, l = self.hidden_dim, self.ffn_dim, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + l * per_layer + d + out + (d + 1 if self.value_head else 0)


class KVCache(NamedTuple):
    """Fixed-size key/value buffers, one pair per layer.

    Separate arrays, not one stacked [L, ...] array: each layer then writes its new slot
    in place and attends over its whole buffer as it lies. Slicing a layer out of a
    stacked cache made XLA copy (and transpose) it for every layer of every decoded token.
    Keys are stored [hd, S] (`_attention_cached`).
    """

    k: tuple  # L × [B, KV, hd, S]
    v: tuple  # L × [B, KV, S, hd]
    valid: Array  # [B, S] bool: slot holds a real token

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, size: int) -> "KVCache":
        kv, hd, dtype = config.num_kv_heads, config.head_dim, cache_dtype(config.compute_dtype)
        def buffers(shape):
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))

        return cls(buffers((batch, kv, hd, size)), buffers((batch, kv, size, hd)), jnp.zeros((batch, size), bool))


def cache_dtype(compute_dtype) -> jnp.dtype:
    """What the KV cache stores values of `compute_dtype` in.

    On CPU, float32 for 16-bit floats (the values written stay rounded to the compute
    dtype). XLA on CPU has no bfloat16 dynamic_update_slice: it converts the whole buffer to
    float32, writes the slot and converts it back, at every layer of every decoded token.
    A bfloat16 SmolLM2 sampler at batch 32 × 32 new tokens took 2.98–3.03 s with a bfloat16
    cache and 2.69–2.73 s with this one (medians of 5 calls, three alternating runs, an
    Intel host with AMX). Storing bit patterns (uint16) instead was slower than bfloat16
    (3.08–3.12 → 3.15–3.30 s): XLA on CPU did not update those buffers in place.
    """
    compute_dtype = jnp.dtype(compute_dtype)
    if compute_dtype.itemsize < 4 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return compute_dtype


class ModelOutput(NamedTuple):
    logits: Array  # [B, T, V] float32
    values: Optional[Array]  # [B, T] float32, when the model has a value head
    cache: Optional[KVCache]
    hidden: Array  # [B, T, D] final normalised hidden states
    # [B, L + 1, T, D]: each layer's input and the last layer's output (with_states=True):
    # what `continuation_logp_from_states` needs in place of a forward pass.
    states: Optional[Array] = None


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float = 0.02, value=None) -> nnx.Param:
    if value is None:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Llama(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, dt = config, jnp.dtype(config.param_dtype)
        l, d, f = c.num_layers, c.hidden_dim, c.ffn_dim
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.embed = _param(rngs, (c.vocab_size, d), ("vocab", "embed"), dt)
        self.attn_norm = _param(rngs, (l, d), ("layers", "embed"), dt, value=jnp.ones((l, d), dt))
        self.wq = _param(rngs, (l, d, q_dim), ("layers", "embed", "heads"), dt)
        self.wk = _param(rngs, (l, d, kv_dim), ("layers", "embed", "kv_heads"), dt)
        self.wv = _param(rngs, (l, d, kv_dim), ("layers", "embed", "kv_heads"), dt)
        self.wo = _param(rngs, (l, q_dim, d), ("layers", "heads", "embed"), dt)
        self.mlp_norm = _param(rngs, (l, d), ("layers", "embed"), dt, value=jnp.ones((l, d), dt))
        self.w_gate = _param(rngs, (l, d, f), ("layers", "embed", "mlp"), dt)
        self.w_up = _param(rngs, (l, d, f), ("layers", "embed", "mlp"), dt)
        self.w_down = _param(rngs, (l, f, d), ("layers", "mlp", "embed"), dt)
        self.final_norm = _param(rngs, (d,), ("embed",), dt, value=jnp.ones((d,), dt))
        self.lm_head = None if c.tie_embeddings else _param(rngs, (d, c.vocab_size), ("embed", "vocab"), dt)
        if c.value_head:
            self.value_w = _param(rngs, (d, 1), ("embed", None), dt)
            self.value_b = _param(rngs, (1,), (None,), dt, value=jnp.zeros((1,), dt))
        else:
            self.value_w = self.value_b = None

    def __call__(self, tokens: Array, valid: Array, cache: Optional[KVCache] = None,
                 index: Array | int = 0, last_only: bool = False, logits_start: int = 0,
                 with_logits: bool = True, layers: Optional[list] = None,
                 with_states: bool = False) -> ModelOutput:
        """Runs the decoder.

        Args:
          tokens: [B, T] int token ids (anything at invalid slots).
          valid: [B, T] bool, False at padding.
          cache: a KV cache to read and write, or None (attend within `tokens`).
          index: slot of tokens[:, 0] in the cache.
          last_only: compute logits (and values) for the last slot only, [B, 1, V]:
            a prefill needs no more, and the output projection is ~20% of the FLOPs.
          logits_start: compute logits (and values) for slots [logits_start, T) only
            (a static int): teacher forcing needs none for the prompt.
          with_logits: False skips the output projection (logits=None): `chunked_token_logp`
            then makes them a chunk at a time from `hidden` and `output_weights()`.
          layers: with a cache, `unstack_layers()` of these parameters, made once per
            generation (None: made in this call): cached calls run the layers as a Python
            loop over separate arrays. In a layer scan, XLA on CPU copies each layer's
            weights out of the stacked arrays (all of them, once per decoded token: about
            half a decode step at batch 16).
          with_states: with a cache, also return `states` (ModelOutput).
        """
        c = self.config
        cdt = jnp.dtype(c.compute_dtype)
        batch, length = tokens.shape
        if valid.shape != tokens.shape:
            raise ValueError(f"valid {valid.shape} and tokens {tokens.shape} shapes disagree")
        key_valid = valid if cache is None else jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
        cos, sin, mask = _rotary_and_mask(c, key_valid, index, length)
        x = self.embed[...][tokens].astype(cdt)
        layer_params = self._stacked_layers()
        layer = functools.partial(_layer, c, cos=cos, sin=sin)

        unroll = c.num_layers if c.unroll_layers else 1
        if cache is None:
            def body(x, params):
                return layer(x, params, lambda q, k, v: (_attention(q, _heads_major(k), _heads_major(v), mask), None))

            if c.remat != "none":  # what the backward pass keeps of each layer: REMAT_POLICIES
                body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[c.remat])
            x, _ = jax.lax.scan(body, x, layer_params, unroll=unroll)
            new_cache = states = None
        else:
            # A Python loop over layers (each with its own weights and cache buffers):
            # nothing is sliced out of stacked arrays once per decoded token.
            new_k, new_v, states = [], [], []
            for params, cache_k, cache_v in zip(layers if layers is not None else self.unstack_layers(),
                                                cache.k, cache.v):
                def attend(q, k, v, cache_k=cache_k, cache_v=cache_v):
                    k_t = jnp.transpose(k, (0, 2, 3, 1))  # [B, KV, hd, T]
                    # k and v are in the compute dtype: a float32 cache (`cache_dtype`) holds their values.
                    ck = jax.lax.dynamic_update_slice(cache_k, k_t.astype(cache_k.dtype), (0, 0, 0, index))
                    cv = jax.lax.dynamic_update_slice(cache_v, _heads_major(v).astype(cache_v.dtype), (0, 0, index, 0))
                    return _attention_cached(q, ck, cv, mask).astype(cdt), (ck, cv)

                states.append(x)
                x, (ck, cv) = layer(x, params, attend)
                new_k.append(ck)
                new_v.append(cv)
            new_k, new_v = tuple(new_k), tuple(new_v)
            new_cache = KVCache(new_k, new_v, key_valid)
            states = jnp.stack(states + [x], axis=1) if with_states else None

        if last_only:
            x = x[:, -1:]
        elif logits_start:
            x = x[:, logits_start:]
        hidden = _rms_norm(x, self.final_norm[...].astype(cdt), c.norm_eps)
        logits = None
        if with_logits:
            if cache is not None and length == 1 and self.lm_head is None and batch <= _COLUMN_LOGITS_MAX_ROWS:
                logits = _decode_logits(hidden, self.embed[...].astype(cdt))
            else:
                logits = _logits(hidden, self.output_weights())
        values = None
        if self.value_w is not None:
            values = _value_estimates(hidden, self.value_w[...], self.value_b[...])
        return ModelOutput(logits=logits, values=values, cache=new_cache, hidden=hidden, states=states)

    def _stacked_layers(self) -> tuple:
        return (self.attn_norm[...], self.wq[...], self.wk[...], self.wv[...], self.wo[...],
                self.mlp_norm[...], self.w_gate[...], self.w_up[...], self.w_down[...])

    def unstack_layers(self, column_blocks: int = 1, transposed: bool = False) -> list:
        """Per-layer parameter tuples sliced out of the stacked [L, ...] arrays (a copy of the
        layer weights, dequantised if they are quant.Quantized): pass them as `layers=` to
        every cached call of one generation.

        column_blocks > 1 cuts the weights of the products that run alone in a layer (o,
        down, and q, k and v joined into one [D, (H + 2·KV)·hd] weight, with wk and wv then
        None) into that many column blocks, a tuple each. Their products are independent, so
        XLA's CPU runtime, which runs a small product on one thread and independent ones
        side by side, keeps both cores busy (`Sampler`). Joined, q, k and v make blocks of
        equal width rather than q's blocks beside the narrower k and v.

        transposed: every product weight (and block) as a TransposedWeight, a row-major copy
        of its transpose: for weights kept across calls (`Sampler.decode_layers`)."""
        c = self.config
        narrowest = min(c.num_heads * c.head_dim, c.hidden_dim)  # wo's and w_down's columns
        if not 1 <= column_blocks <= narrowest:
            raise ValueError(f"column_blocks must be in [1, {narrowest}] (the blocked weights' columns), "
                             f"got {column_blocks}")
        layers = []
        for i in range(c.num_layers):
            params = [p[i].astype(p.dtype) for p in self._stacked_layers()]
            if column_blocks > 1:
                params[1:4] = jnp.concatenate(params[1:4], axis=-1), None, None  # wq | wk | wv
                for j in _BLOCKED_WEIGHTS:
                    params[j] = tuple(jnp.array_split(params[j], column_blocks, axis=-1))
            for j in _PRODUCT_WEIGHTS if transposed else ():
                if isinstance(params[j], tuple):
                    params[j] = tuple(TransposedWeight(b.T) for b in params[j])
                elif params[j] is not None:
                    params[j] = TransposedWeight(params[j].T)
            layers.append(tuple(params))
        return layers

    def output_weights(self) -> Array:
        """The output projection [D, V] in the compute dtype (the embedding's transpose when tied)."""
        out_w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return out_w.astype(jnp.dtype(self.config.compute_dtype))


def _rotary_and_mask(c: LlamaConfig, key_valid: Array, index, length: int):
    """Rotary cos/sin [B, T, hd/2] of the T query slots from `index`, and the attention
    mask [B, T, S] over the key slots (key_valid [B, S])."""
    batch = key_valid.shape[0]
    # Rotary position = number of valid tokens before this slot.
    positions = jnp.cumsum(key_valid, axis=1) - 1
    if key_valid.shape[1] != length:
        positions = jax.lax.dynamic_slice(positions, (0, index), (batch, length))
    cos, sin = _rotary(positions, c.head_dim, c.rope_theta, key_valid.shape[1])
    query_slot = index + jnp.arange(length)
    mask = (jnp.arange(key_valid.shape[1])[None, :] <= query_slot[:, None])[None] & key_valid[:, None, :]
    return cos, sin, mask


# Indices in Llama._stacked_layers of wq (with wk and wv joined to it), wo and w_down:
# the weights that `unstack_layers(column_blocks)` cuts into column blocks.
_BLOCKED_WEIGHTS = (1, 4, 8)
# ... and of every weight that multiplies (wq, wk, wv, wo, w_gate, w_up, w_down).
_PRODUCT_WEIGHTS = (1, 2, 3, 4, 6, 7, 8)


def _layer(c: LlamaConfig, x: Array, params: tuple, attend, *, cos: Array, sin: Array):
    """One decoder layer on x [B, T, D]; `attend(q, k, v)` → (attention output, extra).
    wq, wo and w_down may be tuples of column blocks (wq then holds wk and wv too, and
    those are None), and the product weights TransposedWeights (`Llama.unstack_layers`):
    a decode step (T = 1) with those runs column-major (`_layer_columns`)."""
    cdt = jnp.dtype(c.compute_dtype)
    batch, length = x.shape[:2]
    attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down = (
        tuple(b.astype(cdt) for b in p) if isinstance(p, tuple) else p if p is None else p.astype(cdt) for p in params)
    if length == 1 and isinstance(w_gate, TransposedWeight):  # a decode step with kept layers
        return _layer_columns(c, x, (attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down), attend, cos=cos, sin=sin)
    h = _rms_norm(x, attn_norm, c.norm_eps)
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    if wk is None:  # q, k and v from one product's column blocks
        q, k, v = jnp.split(_blocks_matmul(h, wq), [q_width, q_width + kv_width], axis=-1)
    else:
        q, k, v = _blocks_matmul(h, wq), _matmul(h, wk), _matmul(h, wv)
    q = q.reshape(batch, length, c.num_heads, c.head_dim)
    k = k.reshape(batch, length, c.num_kv_heads, c.head_dim)
    v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
    q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    attn, extra = attend(q, k, v)
    x = x + _blocks_matmul(attn.reshape(batch, length, -1), wo)
    h = _rms_norm(x, mlp_norm, c.norm_eps)
    # Blocks and transposed weights come from unstack_layers, for cached calls, which are
    # never differentiated.
    plain = all(isinstance(w, jax.Array) for w in (w_gate, w_up, w_down))
    x = x + (_swiglu(h, w_gate, w_up, w_down) if plain else _swiglu_fwd(h, w_gate, w_up, w_down)[0])
    return x, extra


def _layer_columns(c: LlamaConfig, x: Array, params: tuple, attend, *, cos: Array, sin: Array):
    """`_layer` of one decoded token x [B, 1, D] with TransposedWeights: the activations
    between products are column-major, [features, B], and each product is w_t [N, K] @
    h [K, B] (attention gets q, k and v as [B, 1, heads, hd]).

    XLA's CPU library kernels read a product's left operand as it is and repack the right
    one: x [B, K] @ w repacks the weight every decoded token, w_t @ h only the few columns of
    h. SmolLM2's decode steps on 2 cores of an AMD EPYC (ad-hoc probes, alternating): 30
    chained MLP layers at 16 rows 30-35 against 46-53 ms per token ([B, K] x [N, K]ᵀ), 32 rows
    46-48 against 60-65; the sampler with kept layers 1.30-1.37x the tokens/s at batch 16,
    1.06x at 32, 1.02-1.05x at 48 and 64."""
    attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down = params
    batch = x.shape[0]

    def mm(w, h_cols):  # w (or its column blocks) [.., N, K] @ h_cols [K, B] -> [N, B]
        if isinstance(w, tuple):
            return jnp.concatenate([mm(b, h_cols) for b in w], axis=0)
        return _rounded_cols(w.w_t, h_cols)

    x_cols = x.reshape(batch, -1).T  # [D, B]
    h = _rms_norm(x_cols, attn_norm[:, None], c.norm_eps, axis=0)
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    # q, k and v transposed to [B, ...] as one: XLA folds a transpose of a lone product into
    # it, which makes that product [B, K] x [K, N] again.
    qkv_cols = mm(wq, h) if wk is None else jnp.concatenate([mm(wq, h), mm(wk, h), mm(wv, h)], axis=0)
    q, k, v = jnp.split(qkv_cols.T, [q_width, q_width + kv_width], axis=-1)
    q = q.reshape(batch, 1, c.num_heads, c.head_dim)
    k = k.reshape(batch, 1, c.num_kv_heads, c.head_dim)
    v = v.reshape(batch, 1, c.num_kv_heads, c.head_dim)
    q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    attn, extra = attend(q, k, v)
    x_cols = x_cols + mm(wo, attn.reshape(batch, -1).T)
    h = _rms_norm(x_cols, mlp_norm[:, None], c.norm_eps, axis=0)
    act = jax.nn.silu(mm(w_gate, h)) * mm(w_up, h)
    x_cols = x_cols + mm(w_down, act)
    return x_cols.T.reshape(batch, 1, -1), extra


def _rounded_cols(w_t: Array, h_cols: Array) -> Array:
    """w_t [N, K] @ h_cols [K, B] in h_cols' dtype (float32 results, rounded once)."""
    if w_t.dtype == h_cols.dtype == jnp.float32:
        return w_t @ h_cols
    return jnp.dot(w_t, h_cols, preferred_element_type=jnp.float32).astype(h_cols.dtype)


def _blocks_matmul(x: Array, w, matmul=_matmul) -> Array:
    """x [..., D] @ w [D, F], w an array (or TransposedWeight) or a tuple of its column
    blocks (their products, concatenated)."""
    if isinstance(w, tuple):
        return jnp.concatenate([matmul(x, block) for block in w], axis=-1)
    return matmul(x, w)


@jax.custom_vjp
def _swiglu(h: Array, w_gate: Array, w_up: Array, w_down: Array) -> Array:
    """SwiGLU MLP on h [..., D]: (silu(h·W_gate) ⊙ h·W_up)·W_down. Its backward is written
    out (`_swiglu_bwd`) for the layout of the weights' gradients, not for different maths."""
    return _swiglu_fwd(h, w_gate, w_up, w_down)[0]  # residuals unused here: XLA drops them


def _swiglu_fwd(h, w_gate, w_up, w_down):
    gate, up = _rounded_matmul(h, w_gate), _rounded_matmul(h, w_up)
    return _blocks_matmul(jax.nn.silu(gate) * up, w_down, _rounded_matmul), (h, gate, up, w_gate, w_up, w_down)


def _swiglu_bwd(residuals, g):
    # The weights' gradients contract over the B·T positions, the leading axis of both
    # factors. Left to itself, XLA's CPU layout assignment made that contraction from a
    # transposed copy of the [B·T, F] gate cotangent, written by the fusion that computes
    # it (~36 ms a layer on SmolLM2 at 32 × 63 positions, more than any matmul of the
    # layer's backward). Here the narrow [B·T, D] factors are transposed once instead
    # (the barrier keeps XLA from folding the transpose back into the dot), and every
    # matmul is a plain row-major product.
    h, gate, up, w_gate, w_up, w_down = residuals
    d_model, hidden_dim = h.shape[-1], gate.shape[-1]
    h2, g2 = h.reshape(-1, d_model), g.reshape(-1, d_model)
    gate2, up2 = gate.reshape(-1, hidden_dim), up.reshape(-1, hidden_dim)
    sig = jax.nn.sigmoid(gate2)
    act = gate2 * sig
    d_hidden = _rounded_matmul(g2, _transposed(w_down))
    d_up = d_hidden * act
    d_gate = d_hidden * up2 * (sig * (1 + gate2 * (1 - sig)))
    h_t, g_t = jax.lax.optimization_barrier((_transposed(h2), _transposed(g2)))
    d_w_gate = _rounded_matmul(h_t, d_gate).astype(w_gate.dtype)
    d_w_up = _rounded_matmul(h_t, d_up).astype(w_up.dtype)
    d_w_down = _rounded_matmul(g_t, act * up2).T.astype(w_down.dtype)
    d_h = _rounded_matmul(d_gate, _transposed(w_gate)) + _rounded_matmul(d_up, _transposed(w_up))
    d_h = d_h.reshape(h.shape).astype(h.dtype)
    return d_h, d_w_gate, d_w_up, d_w_down


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _value_estimates(hidden: Array, value_w: Array, value_b: Array) -> Array:
    """The value head: [B, T, D] final hidden states → [B, T] float32 values."""
    return (hidden.astype(jnp.float32) @ value_w.astype(jnp.float32))[..., 0] + value_b[0]


def _rms_norm(x: Array, scale: Array, eps: float, axis: int = -1) -> Array:
    """RMSNorm of x over its features, `axis` (scale broadcast against x)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def _rotary(positions: Array, head_dim: int, theta: float, num_positions: int):
    """cos, sin [B, T, hd/2] for rotate-half rotary embeddings at positions [B, T] in
    [0, num_positions) (others are clamped: they are padding).

    Looked up in tables made with numpy when tracing, not computed in the graph: XLA on
    CPU fuses a cos/sin into every consumer, so a decode step evaluated them again in each
    layer's q and k fusions. In a profile of SmolLM2's sampler at batch 16 (2 cores, ad hoc)
    those fusions took 109 ms of op time per call, 3%; with the tables 47 ms."""
    cos_table, sin_table = _rotary_tables(head_dim, float(theta), num_positions)
    index = jnp.clip(positions, 0, num_positions - 1)
    return jnp.asarray(cos_table)[index], jnp.asarray(sin_table)[index]


@functools.lru_cache(maxsize=64)
def _rotary_tables(head_dim: int, theta: float, num_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [num_positions, hd/2] float32, computed as the graph would: float32 angles."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, hd]: pairs (i, i + hd/2) rotate together (HF's rotate-half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _heads_major(x: Array) -> Array:
    """[B, T, KV, hd] → [B, KV, T, hd]."""
    return jnp.swapaxes(x, 1, 2)


def _attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention. q [B,T,H,hd], k/v [B,KV,S,hd], mask [B,T,S] → [B,T,H,hd].
    Query head h uses KV head h // (H / KV)."""
    b, t, h, hd = q.shape
    num_kv_heads = k.shape[1]
    q = q.reshape(b, t, num_kv_heads, h // num_kv_heads, hd)
    scores = _einsum_f32("btkgd,bksd->bkgts", q, k) / jnp.sqrt(hd).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def _attention_cached(q: Array, k_t: Array, v: Array, mask: Array) -> Array:
    """`_attention` over a KV cache whose keys are stored transposed: q [B,T,H,hd],
    k_t [B,KV,hd,S], v [B,KV,S,hd], mask [B,T,S] → [B,T,H,hd].

    One query per row (a decode step): products and sums, which XLA fuses into one pass
    over the cache; as batched matmuls of G × S blocks it moved the cache through
    transposed copies first (with per-layer buffers, 32 tokens at batch 64: 6.6 → 5.9 s).
    Keys stored [hd, S] make the score sums run over a non-minor axis with the slots as
    the vector lanes (30 layers at batch 32, 64 slots: 12.7 → 8.7 ms per decoded token
    in an ad-hoc probe, against keys stored [S, hd]).
    """
    b, t, h, hd = q.shape
    if t > 1:  # a prefill: teacher forcing's batched matmuls (XLA folds the swap into them)
        return _attention(q, jnp.swapaxes(k_t, 2, 3), v, mask)
    num_kv_heads = k_t.shape[1]
    qq = q.reshape(b, num_kv_heads, h // num_kv_heads, hd, 1).astype(jnp.float32)  # [B, KV, G, hd, 1]
    scores = jnp.sum(qq * k_t[:, :, None].astype(jnp.float32), axis=3) / jnp.sqrt(hd).astype(jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # [B, KV, G, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.sum(probs[..., None] * v[:, :, None], axis=3)  # [B, KV, G, hd]
    return out.reshape(b, 1, h, hd)


# --- functional face: plain jax.jit over (graphdef, params) -----------------

def forward(graphdef, params, tokens: Array, valid: Array, cache: Optional[KVCache] = None,
            index: Array | int = 0, last_only: bool = False, logits_start: int = 0,
            with_logits: bool = True, layers: Optional[list] = None, with_states: bool = False) -> ModelOutput:
    """The model as a pure function of its parameter state."""
    return nnx.merge(graphdef, params)(tokens, valid, cache, index, last_only, logits_start, with_logits, layers,
                                       with_states)


def token_logp_from_logits(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[target] without materialising the log-softmax.
    logits [..., V] (cast to float32), targets [...] → [...]."""
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


@jax.custom_vjp
def _projected_token_logp(hidden: Array, out_w: Array, targets: Array) -> Array:
    """token_logp_from_logits(hidden @ out_w, targets): hidden [..., D], out_w [D, V],
    targets [...] int → [...] float32, with a backward pass written for memory (below)."""
    return token_logp_from_logits(_logits(hidden, out_w), targets)


def _projected_token_logp_fwd(hidden, out_w, targets):
    logits = _logits(hidden, out_w)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return chosen - log_norm, (hidden, out_w, targets, logits, log_norm)


def _projected_token_logp_bwd(residuals, g):
    """Written for memory. The logits' cotangent g·(onehot(target) − softmax) is one
    elementwise pass over the logits (autodiff makes a scatter of g and a
    transposed copy: two more [..., V] buffers). Both projections' gradients are made
    from it at once (`_output_projection_grads`)."""
    hidden, out_w, targets, logits, log_norm = residuals
    d_logits = _logits_cotangent(logits, log_norm, targets, g).astype(out_w.dtype)
    d_hidden, d_out_w = _output_projection_grads(hidden, d_logits, _transposed(out_w))
    return d_hidden, d_out_w.astype(out_w.dtype), None


def _logits_cotangent(logits: Array, log_norm: Array, targets: Array, g: Array) -> Array:
    """d/d logits of Σ g · (logits[target] − log_norm): logits [..., V], the rest [...]."""
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    return g[..., None] * (onehot - jnp.exp(logits - log_norm[..., None]))


def _output_operands(out_w: Array) -> tuple:
    """out_w [D, V] and its transpose [V, D] as the output projection's products take them
    (`_transposed`: float32 as they are, low precision on CPU row-major copies). Make them
    once per call."""
    return _transposed(out_w.T), _transposed(out_w)


def _output_projection_grads(hidden: Array, d_logits: Array, w_vd: Array):
    """The gradients of the output projection logits = hidden @ out_w from their cotangent:
    hidden [..., D], d_logits [..., V], w_vd = out_w.T [V, D] (`_output_operands`) →
    d_hidden [..., D] in hidden's dtype, d_out_w [D, V] float32.

    d_hidden is made to depend on d_out_w: XLA otherwise defers the weights' gradient past
    the layers' backward pass, holding the [..., V] cotangent through all of it. (An
    optimization_barrier does not hold: XLA on CPU expands it away before ordering the
    instructions.)"""
    d_out_w = _dot_f32(_transposed(hidden.reshape(-1, hidden.shape[-1])), d_logits.reshape(-1, d_logits.shape[-1]))
    d_hidden = _dot_f32(d_logits, w_vd)
    d_hidden = (d_hidden + 0 * d_out_w[0, 0]).astype(hidden.dtype)  # the ordering dependency (0·x: XLA keeps it)
    return d_hidden, d_out_w


_projected_token_logp.defvjp(_projected_token_logp_fwd, _projected_token_logp_bwd)


def chunked_token_logp(hidden: Array, out_w: Array, targets: Array, chunk: int) -> Array:
    """log softmax(hidden @ out_w)[targets], `chunk` positions of logits at a time.

    hidden [B, N, D], out_w [D, V], targets [B, N] int → [B, N] float32.
    The full [B, N, V] logits (and, under grad, their softmax and cotangent) never
    exist: a scan over chunks of the N axis, each recomputed in the backward pass
    (jax.checkpoint), holds one [B, chunk / B, V] block at a time. The batch axis
    stays whole, so a batch split over a mesh stays split. chunk = 0: all at once.
    """
    b, n, d = hidden.shape
    if targets.shape != (b, n):
        raise ValueError(f"targets {targets.shape} must be [B, N] = {(b, n)} to match hidden {hidden.shape}")
    per_chunk = _positions_per_chunk(b, n, chunk)

    def block(h, t):
        return _projected_token_logp(h, out_w, t)

    if per_chunk == n:
        return block(hidden, targets)
    xs = (_to_chunks(hidden, per_chunk), _to_chunks(targets, per_chunk))
    _, logp = jax.lax.scan(jax.checkpoint(lambda _, ht: (None, block(*ht)), prevent_cse=False), None, xs)
    return _from_chunks(logp, n)


def _positions_per_chunk(batch: int, n: int, chunk: int) -> int:
    """Positions along N per block of `chunk` logits rows (the batch stays whole); 0 = all."""
    return n if chunk <= 0 else max(1, min(n, chunk // batch))


def _to_chunks(x: Array, per_chunk: int) -> Array:
    """[B, N, ...] → [num, B, per_chunk, ...], N zero-padded to a multiple of per_chunk."""
    b, n = x.shape[:2]
    num = -(-n // per_chunk)
    x = jnp.pad(x, ((0, 0), (0, num * per_chunk - n)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(b, num, per_chunk, *x.shape[2:]).swapaxes(0, 1)


def _from_chunks(x: Array, n: int) -> Array:
    """The inverse of `_to_chunks`: [num, B, per_chunk, ...] → [B, n, ...]."""
    num, b, per_chunk = x.shape[:3]
    return x.swapaxes(0, 1).reshape(b, num * per_chunk, *x.shape[3:])[:, :n]


def continuation_logp(graphdef, params, prompt: Array, prompt_valid: Array, completion: Array,
                      completion_mask: Array):
    """Teacher-forced per-token log-probs of a completion given a left-padded prompt.

    Args:
      prompt: [B, P] left-padded prompt tokens; prompt_valid [B, P].
      completion: [B, N] generated tokens; completion_mask [B, N] (False after EOS).

    Returns:
      (token_logp [B, N] float32, 0 where masked; values [B, N] or None: the
      value head's estimate at each completion token's *input* state, i.e. V(s_t)
      read before token t is chosen).
    """
    tokens = jnp.concatenate([prompt, completion], axis=1)
    valid = jnp.concatenate([prompt_valid, completion_mask], axis=1)
    p = prompt.shape[1]
    # Logits at slot i predict slot i + 1: only slots p − 1 … p + N − 2 are needed.
    model = nnx.merge(graphdef, params)
    out = model(tokens[:, :-1], valid[:, :-1], logits_start=p - 1, with_logits=False)
    token_logp = chunked_token_logp(out.hidden, model.output_weights(), completion, model.config.logits_chunk)
    return jnp.where(completion_mask, token_logp, 0.0), out.values


def continuation_logp_from_states(graphdef, params, prompt: Array, prompt_valid: Array, completion: Array,
                                  completion_mask: Array, states: Array, token_logp: Array) -> Array:
    """`continuation_logp(...)[0]` of a completion the sampler drew from these params at
    temperature 1 (no truncation), without running the model forward.

    The sampler's log-probs `token_logp` [B, N] are the values (they equal teacher
    forcing's within float rounding). The gradient with respect to `params` is teacher
    forcing's, computed from the sampler's `states` [B, L + 1, P + N − 1, D] (each layer's
    input at every slot it read, and the last layer's output: `Sampler(keep_states=True)`):
    each layer's backward pass recomputes that layer from its input, as the layer scan
    does under `remat="full"`, but the forward pass that would remake those inputs is
    the sampling already done. `states` and `token_logp` get no gradient.
    """
    _check_states(prompt, completion, states, token_logp)
    return _logp_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states,
                             token_logp)


def _check_states(prompt, completion, states, token_logp):
    b, n = completion.shape
    slots = prompt.shape[1] + n - 1
    if token_logp.shape != (b, n):
        raise ValueError(f"token_logp {token_logp.shape} must be [B, N] = {(b, n)} like completion")
    if states.ndim != 4 or states.shape[0] != b or states.shape[2] != slots:
        raise ValueError(f"states {states.shape} must be [B, L + 1, P + N - 1, D] with B = {b} and "
                         f"P + N - 1 = {slots} (prompt {prompt.shape}, completion {completion.shape})")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logp_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states, token_logp):
    return jnp.where(completion_mask, token_logp, 0.0)


def _logp_from_states_fwd(graphdef, params, prompt, prompt_valid, completion, completion_mask, states,
                          token_logp):
    out = jnp.where(completion_mask, token_logp, 0.0)
    return out, (params, prompt, prompt_valid, completion, completion_mask, states)


def _logp_from_states_bwd(graphdef, residuals, g):
    params, prompt, prompt_valid, completion, completion_mask, states = residuals
    d_params = _grads_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states, g)
    return d_params, None, None, None, None, None, None


_LAYER_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")  # _stacked_layers


def _grads_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states, g, into=None,
                       value_cotangent=None):
    """Gradient of Σ g · token_logp [B, N] (+ Σ value_cotangent · values [B, N], where given)
    with respect to params, from the layers' inputs `states` [B, L + 1, P + N − 1, D]: each
    layer's vjp at its input. With `into` (a float32 tree like params), returns into + that
    gradient, each layer's gradient added into its slice of the stacked sums as the layer
    scan goes: no second params-sized buffer for the new gradient (gradient accumulation)."""
    model = nnx.merge(graphdef, params)
    c = model.config
    cdt = jnp.dtype(c.compute_dtype)
    tokens, layer = _teacher_forcing_layer(c, prompt, prompt_valid, completion, completion_mask)
    start = prompt.shape[1] - 1  # slot whose logits predict the first completion token
    g = jnp.where(completion_mask, g, 0.0)

    # The head: final norm, then the output projection a chunk at a time (three matmuls
    # per chunk: logits, and the two products of their cotangent).
    final_norm = model.final_norm[...]
    x_top = states[:, -1, start:].astype(cdt)
    hidden, norm_vjp = jax.vjp(lambda x, s: _rms_norm(x, s.astype(cdt), c.norm_eps), x_top, final_norm)
    out_w = model.output_weights()
    d_hidden, d_out_w = _token_logp_grads(hidden, out_w, completion, g, c.logits_chunk)
    grads = {}
    if value_cotangent is not None:
        if model.value_w is None:
            raise ValueError("value_cotangent given, but the model has no value head (LlamaConfig.value_head)")
        _, values_vjp = jax.vjp(_value_estimates, hidden, model.value_w[...], model.value_b[...])
        d_hidden_values, grads["value_w"], grads["value_b"] = values_vjp(
            jnp.where(completion_mask, value_cotangent, 0.0).astype(jnp.float32))
        d_hidden = d_hidden + d_hidden_values.astype(d_hidden.dtype)
    d_x_top, d_final_norm = norm_vjp(d_hidden.astype(hidden.dtype))
    d_x = jnp.zeros(states.shape[:1] + states.shape[2:], cdt).at[:, start:].set(d_x_top)

    # The layers, last to first: each layer's vjp at its input as the sampler saw it.
    def layer_grads(d_x, params_l, i):
        x_l = jax.lax.dynamic_index_in_dim(states, i, axis=1, keepdims=False).astype(cdt)
        _, layer_vjp = jax.vjp(lambda p, x: layer(x, p), params_l, x_l)
        d_params_l, d_x = layer_vjp(d_x)
        return d_x, d_params_l

    unroll = c.num_layers if c.unroll_layers else 1
    layer_index = jnp.arange(c.num_layers)
    if into is None:
        def back(d_x, xs):
            return layer_grads(d_x, *xs)

        d_x, d_layers = jax.lax.scan(back, d_x, (model._stacked_layers(), layer_index), reverse=True,
                                     unroll=unroll)
    else:
        def back_into(carry, xs):
            d_x, sums = carry
            i = xs[1]
            d_x, d_params_l = layer_grads(d_x, *xs)
            sums = tuple(jax.lax.dynamic_update_index_in_dim(
                total, jax.lax.dynamic_index_in_dim(total, i, keepdims=False) + d.astype(total.dtype), i, 0)
                for total, d in zip(sums, d_params_l))
            return (d_x, sums), None

        sums = tuple(into[name][...].reshape(w.shape) for name, w in zip(_LAYER_NAMES, model._stacked_layers()))
        (d_x, d_layers), _ = jax.lax.scan(back_into, (d_x, sums), (model._stacked_layers(), layer_index),
                                          reverse=True, unroll=unroll)

    embed = model.embed[...]
    d_embed = (jnp.zeros(embed.shape, jnp.float32) if into is None else into["embed"][...].reshape(embed.shape))
    d_embed = d_embed.at[tokens].add(d_x.astype(jnp.float32))
    grads.update(zip(_LAYER_NAMES, d_layers))
    grads["final_norm"] = d_final_norm
    if model.lm_head is None:
        d_embed = d_embed + d_out_w.T.astype(jnp.float32)
    else:
        grads["lm_head"] = d_out_w
    grads["embed"] = d_embed

    def grad_of(path, leaf):
        name = path[0].key if hasattr(path[0], "key") else str(path[0])
        if name in ("value_w", "value_b") and name not in grads:  # no value cotangent: the log-probs' gradient
            return jnp.zeros_like(leaf) if into is None else into[name][...]
        if name not in grads:
            raise ValueError(f"continuation_logp_from_states has no gradient for parameter {name!r}")
        if into is None:
            return grads[name].astype(leaf.dtype).reshape(leaf.shape)
        total = grads[name].reshape(leaf.shape)
        return total if name in _LAYER_NAMES or name == "embed" else into[name][...] + total.astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(grad_of, params)


def accumulate_continuation_grads(graphdef, params, prompt: Array, prompt_valid: Array, completion: Array,
                                  completion_mask: Array, token_cotangent: Array, into):
    """into + ∇_params Σ token_cotangent · continuation_logp(...)[0], for gradient accumulation.

    A forward pass keeps each layer's input ([B, L + 1, P + N − 1, D], as the sampler's
    `states`), then the backward pass recomputes one layer at a time from them (the memory
    of remat="full") and adds each layer's gradient into its slice of `into` (a float32
    tree like params: the running sum over microbatches). token_cotangent [B, N]: for the
    gradient of Σ_i c_i · log π(x_i), c_i broadcast over x_i's tokens.
    """
    if token_cotangent.shape != completion.shape:
        raise ValueError(f"token_cotangent {token_cotangent.shape} must be [B, N] like completion "
                         f"{completion.shape}")
    states = jax.lax.stop_gradient(_teacher_forced_states(graphdef, params, prompt, prompt_valid, completion,
                                                          completion_mask))
    return _grads_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states,
                              token_cotangent.astype(jnp.float32), into=into)


def accumulate_loss_grads(graphdef, params, prompt: Array, prompt_valid: Array, completion: Array,
                          completion_mask: Array, loss_fn, into):
    """into + ∇_params loss_fn(token_logp, values)[0], where (token_logp, values) =
    continuation_logp(...): gradient accumulation for a loss that is not linear in the
    log-probs (PPO's clipped ratio, the value loss). loss_fn maps [B, N] log-probs (0 where
    masked) and [B, N] values (None without a value head) to (loss, aux).

    As in accumulate_continuation_grads, a forward pass keeps each layer's input; the head
    then makes the log-probs and values from the last layer's output (one more pass of the
    output projection), loss_fn's gradient with respect to them is the backward pass's
    cotangent, and each layer's gradient is added into `into` as it is made: no second
    params-sized buffer. Returns (into + gradient, (loss, aux)).
    """
    states = jax.lax.stop_gradient(_teacher_forced_states(graphdef, params, prompt, prompt_valid, completion,
                                                          completion_mask))
    model = nnx.merge(graphdef, params)
    c = model.config
    cdt = jnp.dtype(c.compute_dtype)
    hidden = _rms_norm(states[:, -1, prompt.shape[1] - 1:].astype(cdt), model.final_norm[...].astype(cdt), c.norm_eps)
    token_logp = chunked_token_logp(hidden, model.output_weights(), completion, c.logits_chunk)
    token_logp = jax.lax.stop_gradient(jnp.where(completion_mask, token_logp, 0.0))
    values = (None if model.value_w is None else
              jax.lax.stop_gradient(_value_estimates(hidden, model.value_w[...], model.value_b[...])))
    (loss, aux), (g, value_cotangent) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(token_logp, values)
    grads = _grads_from_states(graphdef, params, prompt, prompt_valid, completion, completion_mask, states, g,
                               into=into, value_cotangent=value_cotangent)
    return grads, (loss, aux)


def _teacher_forcing_layer(c: LlamaConfig, prompt, prompt_valid, completion, completion_mask):
    """The slots teacher forcing reads (tokens [B, P + N − 1]: the prompt, then every
    completion token but the last) and one decoder layer over them, `layer(x, params_l)`."""
    tokens = jnp.concatenate([prompt, completion], axis=1)[:, :-1]
    valid = jnp.concatenate([prompt_valid, completion_mask], axis=1)[:, :-1]
    cos, sin, mask = _rotary_and_mask(c, valid, 0, tokens.shape[1])
    attend = lambda q, k, v: (_attention(q, _heads_major(k), _heads_major(v), mask), None)
    return tokens, lambda x, params_l: _layer(c, x, params_l, attend, cos=cos, sin=sin)[0]


def _teacher_forced_states(graphdef, params, prompt, prompt_valid, completion, completion_mask) -> Array:
    """Each layer's input at every slot teacher forcing reads, and the last layer's output:
    [B, L + 1, P + N − 1, D] in the compute dtype (the sampler's `states` layout)."""
    model = nnx.merge(graphdef, params)
    c = model.config
    tokens, layer = _teacher_forcing_layer(c, prompt, prompt_valid, completion, completion_mask)

    def body(x, params_l):
        return layer(x, params_l), x

    x = model.embed[...][tokens].astype(jnp.dtype(c.compute_dtype))
    unroll = c.num_layers if c.unroll_layers else 1
    x, inputs = jax.lax.scan(body, x, model._stacked_layers(), unroll=unroll)
    return jnp.concatenate([inputs.swapaxes(0, 1), x[:, None]], axis=1)


_logp_from_states.defvjp(_logp_from_states_fwd, _logp_from_states_bwd)


def _token_logp_grads(hidden: Array, out_w: Array, targets: Array, g: Array, chunk: int):
    """Gradients of Σ g · log softmax(hidden @ out_w)[targets] with respect to hidden [B, N, D]
    and out_w [D, V], `chunk` positions of logits at a time (as `chunked_token_logp`)."""
    b, n, _ = hidden.shape
    per_chunk = _positions_per_chunk(b, n, chunk)
    xs = tuple(_to_chunks(x, per_chunk) for x in (hidden, targets, g))
    w_dv, w_vd = _output_operands(out_w)  # once for all chunks

    def block(d_out_w, xs):
        h_c, t_c, g_c = xs
        logits = _dot_f32(h_c, w_dv)
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        d_logits = _logits_cotangent(logits, log_norm, t_c, g_c).astype(out_w.dtype)
        d_h, d_w = _output_projection_grads(h_c, d_logits, w_vd)
        return d_out_w + d_w, d_h

    d_out_w, d_h = jax.lax.scan(block, jnp.zeros(out_w.shape, jnp.float32), xs)
    return _from_chunks(d_h, n), d_out_w
