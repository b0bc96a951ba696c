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

from fdrl.models import kernels
from fdrl.models.kernels import TransposedWeight

Array = jax.Array


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
    # what `logprobs.continuation_logp_from_states` needs in place of a forward pass.
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
          with_logits: False skips the output projection (logits=None): `logprobs.chunked_token_logp`
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
            if cache is not None and length == 1 and self.lm_head is None and batch <= kernels.COLUMN_LOGITS_MAX_ROWS:
                logits = kernels.decode_logits(hidden, self.embed[...].astype(cdt))
            else:
                logits = kernels.output_logits(hidden, self.output_weights())
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
        q, k, v = jnp.split(kernels.blocks_matmul(h, wq), [q_width, q_width + kv_width], axis=-1)
    else:
        q, k, v = kernels.blocks_matmul(h, wq), kernels.matmul(h, wk), kernels.matmul(h, wv)
    q = q.reshape(batch, length, c.num_heads, c.head_dim)
    k = k.reshape(batch, length, c.num_kv_heads, c.head_dim)
    v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
    q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    attn, extra = attend(q, k, v)
    x = x + kernels.blocks_matmul(attn.reshape(batch, length, -1), wo)
    h = _rms_norm(x, mlp_norm, c.norm_eps)
    # Blocks and transposed weights come from unstack_layers, for cached calls, which are
    # never differentiated.
    plain = all(isinstance(w, jax.Array) for w in (w_gate, w_up, w_down))
    x = x + (kernels.swiglu(h, w_gate, w_up, w_down) if plain else kernels.swiglu_fwd(h, w_gate, w_up, w_down)[0])
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
        return kernels.rounded_cols(w.w_t, h_cols)

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
    scores = kernels.einsum_f32("btkgd,bksd->bkgts", q, k) / jnp.sqrt(hd).astype(jnp.float32)
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
