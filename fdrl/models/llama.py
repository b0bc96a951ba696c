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
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

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
    """Fixed-size key/value buffers for every layer."""

    k: Array  # [L, B, S, KV, hd]
    v: Array  # [L, B, S, KV, hd]
    valid: Array  # [B, S] bool: slot holds a real token

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, size: int) -> "KVCache":
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
        dtype = jnp.dtype(config.compute_dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, size), bool))


class ModelOutput(NamedTuple):
    logits: Array  # [B, T, V] float32
    values: Optional[Array]  # [B, T] float32, when the model has a value head
    cache: Optional[KVCache]
    hidden: Array  # [B, T, D] final normalised hidden states


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
                 with_logits: bool = True, layers: Optional[list] = None) -> ModelOutput:
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
            generation: the layers then run as a Python loop over separate arrays. In the
            layer scan, XLA on CPU copies each layer's weights out of the stacked arrays
            (all of them, once per decoded token: about half a decode step at batch 16).
        """
        c = self.config
        cdt = jnp.dtype(c.compute_dtype)
        batch, length = tokens.shape
        if valid.shape != tokens.shape:
            raise ValueError(f"valid {valid.shape} and tokens {tokens.shape} shapes disagree")
        if cache is None:
            key_valid, size = valid, length
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
            size = cache.valid.shape[1]
        # Rotary position = number of valid tokens before this slot.
        positions = jnp.cumsum(key_valid, axis=1) - 1
        positions = jax.lax.dynamic_slice(positions, (0, index), (batch, length)) if cache is not None else positions
        cos, sin = _rotary(positions, c.head_dim, c.rope_theta)
        query_slot = index + jnp.arange(length)
        mask = (jnp.arange(size)[None, :] <= query_slot[:, None])[None] & key_valid[:, None, :]  # [B, T, S]

        x = self.embed[...][tokens].astype(cdt)
        layer_params = self._stacked_layers()

        def layer(x, params, attend):
            """One decoder layer; `attend(q, k, v)` → (attention output, extra carry)."""
            attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down = (p.astype(cdt) for p in params)
            h = _rms_norm(x, attn_norm, c.norm_eps)
            q = (h @ wq).reshape(batch, length, c.num_heads, c.head_dim)
            k = (h @ wk).reshape(batch, length, c.num_kv_heads, c.head_dim)
            v = (h @ wv).reshape(batch, length, c.num_kv_heads, c.head_dim)
            q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
            attn, extra = attend(q, k, v)
            x = x + attn.reshape(batch, length, -1) @ wo
            h = _rms_norm(x, mlp_norm, c.norm_eps)
            x = x + (jax.nn.silu(h @ w_gate) * (h @ w_up)) @ w_down
            return x, extra

        unroll = c.num_layers if c.unroll_layers else 1
        if cache is None:
            def body(x, params):
                return layer(x, params, lambda q, k, v: (_attention(q, k, v, mask, c.num_kv_heads), None))

            if c.remat != "none":  # what the backward pass keeps of each layer: REMAT_POLICIES
                body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[c.remat])
            x, _ = jax.lax.scan(body, x, layer_params, unroll=unroll)
            new_cache = None
        else:
            # The whole cache rides in the scan's carry and each layer writes its new
            # keys/values in place: scanning over the cache as xs/ys would copy all of
            # it (every layer, every slot) once per decoded token.
            def body(carry, params):
                x, cache_k, cache_v, i = carry

                def attend(q, k, v):
                    ck = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (i, 0, index, 0, 0))
                    cv = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (i, 0, index, 0, 0))
                    layer_k = jax.lax.dynamic_index_in_dim(ck, i, keepdims=False)
                    layer_v = jax.lax.dynamic_index_in_dim(cv, i, keepdims=False)
                    return _attention(q, layer_k, layer_v, mask, c.num_kv_heads), (ck, cv)

                x, (cache_k, cache_v) = layer(x, params, attend)
                return (x, cache_k, cache_v, i + 1), None

            if layers is None:
                (x, new_k, new_v, _), _ = jax.lax.scan(body, (x, cache.k, cache.v, jnp.int32(0)), layer_params,
                                                       unroll=unroll)
            else:  # unstacked weights (`unstack_layers`): a Python loop over layers, nothing sliced
                carry = (x, cache.k, cache.v, 0)
                for params in layers:
                    carry, _ = body(carry, params)
                x, new_k, new_v, _ = carry
            new_cache = KVCache(new_k, new_v, key_valid)

        if last_only:
            x = x[:, -1:]
        elif logits_start:
            x = x[:, logits_start:]
        hidden = _rms_norm(x, self.final_norm[...].astype(cdt), c.norm_eps)
        logits = None
        if with_logits:
            logits = jnp.dot(hidden, self.output_weights(), preferred_element_type=jnp.float32).astype(jnp.float32)
        values = None
        if self.value_w is not None:
            values = (hidden.astype(jnp.float32) @ self.value_w[...].astype(jnp.float32))[..., 0] + self.value_b[...][0]
        return ModelOutput(logits=logits, values=values, cache=new_cache, hidden=hidden)

    def _stacked_layers(self) -> tuple:
        return (self.attn_norm[...], self.wq[...], self.wk[...], self.wv[...], self.wo[...],
                self.mlp_norm[...], self.w_gate[...], self.w_up[...], self.w_down[...])

    def unstack_layers(self) -> list:
        """Per-layer parameter tuples sliced out of the stacked [L, ...] arrays (a copy of the
        layer weights, dequantised if they are quant.Quantized): pass them as `layers=` to
        every cached call of one generation."""
        return [tuple(p[i].astype(p.dtype) for p in self._stacked_layers()) for i in range(self.config.num_layers)]

    def output_weights(self) -> Array:
        """The output projection [D, V] in the compute dtype (the embedding's transpose when tied)."""
        out_w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return out_w.astype(jnp.dtype(self.config.compute_dtype))


def _rms_norm(x: Array, scale: Array, eps: float) -> Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def _rotary(positions: Array, head_dim: int, theta: float):
    """cos, sin [B, T, hd/2] for rotate-half rotary embeddings."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, hd]: pairs (i, i + hd/2) rotate together (HF's rotate-half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _attention(q: Array, k: Array, v: Array, mask: Array, num_kv_heads: int) -> Array:
    """Grouped-query attention. q [B,T,H,hd], k/v [B,S,KV,hd], mask [B,T,S] → [B,T,H,hd].
    Query head h uses KV head h // (H / KV)."""
    b, t, h, hd = q.shape
    q = q.reshape(b, t, num_kv_heads, h // num_kv_heads, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hd).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


# --- functional face: plain jax.jit over (graphdef, params) -----------------

def forward(graphdef, params, tokens: Array, valid: Array, cache: Optional[KVCache] = None,
            index: Array | int = 0, last_only: bool = False, logits_start: int = 0,
            with_logits: bool = True, layers: Optional[list] = None) -> ModelOutput:
    """The model as a pure function of its parameter state."""
    return nnx.merge(graphdef, params)(tokens, valid, cache, index, last_only, logits_start, with_logits, layers)


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
    return token_logp_from_logits(jnp.dot(hidden, out_w, preferred_element_type=jnp.float32), targets)


def _projected_token_logp_fwd(hidden, out_w, targets):
    logits = jnp.dot(hidden, out_w, preferred_element_type=jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return chosen - log_norm, (hidden, out_w, targets, logits, log_norm)


def _projected_token_logp_bwd(residuals, g):
    """Written for memory. The logits' cotangent g·(onehot(target) − softmax) is one
    elementwise pass over the logits (autodiff makes a scatter of g and a
    transposed copy: two more [..., V] buffers). Both projections' gradients are made
    from it at once, and the hidden states' gradient is made to depend on the output
    weights' one: XLA otherwise defers the weights' gradient past the layers' backward
    pass, holding the [..., V] cotangent through all of it. (An optimization_barrier
    does not hold: XLA on CPU expands it away before ordering the instructions.)"""
    hidden, out_w, targets, logits, log_norm = residuals
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    d_logits = (g[..., None] * (onehot - jnp.exp(logits - log_norm[..., None]))).astype(out_w.dtype)
    d_out_w = jnp.einsum("...d,...v->dv", hidden, d_logits, preferred_element_type=jnp.float32).astype(out_w.dtype)
    d_hidden = jnp.dot(d_logits, out_w.T, preferred_element_type=jnp.float32)
    d_hidden = (d_hidden + 0 * d_out_w[0, 0]).astype(hidden.dtype)  # the ordering dependency (0·x: XLA keeps it)
    return d_hidden, d_out_w, None


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
    per_chunk = n if chunk <= 0 else max(1, min(n, chunk // b))

    def block(h, t):
        return _projected_token_logp(h, out_w, t)

    if per_chunk == n:
        return block(hidden, targets)
    num = -(-n // per_chunk)
    pad = num * per_chunk - n
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, num, per_chunk, d).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, num, per_chunk).swapaxes(0, 1)
    _, logp = jax.lax.scan(jax.checkpoint(lambda _, ht: (None, block(*ht)), prevent_cse=False), None, (h, t))
    return logp.swapaxes(0, 1).reshape(b, num * per_chunk)[:, :n]


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
