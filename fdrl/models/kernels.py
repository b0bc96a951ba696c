"""The decoder's products, tuned for how XLA runs them: float32 results from low-precision
operands, layouts that XLA's CPU kernels run fast, and SwiGLU and bfloat16 matmuls with
hand-written backward passes.

Each function is a plain array function (`jit`-able, no state); `fdrl.models.llama`
builds its layers from them and `fdrl.models.logprobs` its output projections. The
maths is always x @ w; what differs is the layout, the dtype of the result and where it
is rounded, with the measurements that chose each in the docstrings.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Array = jax.Array


# A decode step of at most this many rows makes its logits as embed [V, D] @ hidden [D, B]
# on CPU (`decode_logits`).
COLUMN_LOGITS_MAX_ROWS = 32


def decode_logits(hidden: Array, embed: Array) -> Array:
    """A decode step's tied output projection: hidden [B, 1, D] against embed [V, D] → float32
    logits [B, 1, V].

    On CPU as embed @ hidden [D, B], transposed after: XLA's CPU kernels repack a product's
    right operand, and hidden @ embedᵀ repacks the whole [V, D] embedding every decoded
    token. SmolLM2 (V = 49152, D = 576) on 2 cores of an AMD EPYC (ad hoc, medians of 5
    alternating rounds): the product alone 10.0 against 16.6 ms at 16 rows, 15.7 against
    21.2 at 32, but 31.5 against 25.9 at 64 (hence `COLUMN_LOGITS_MAX_ROWS`); the sampler
    with kept layers 1.05-1.10x the tokens/s at batch 16, 1.04-1.08x at 32 (one run of three
    0.93x, as the host slowed). The barrier keeps XLA from folding the transpose back into
    the product."""
    def columns(hidden, embed):
        f32 = jnp.float32  # as einsum_f32 on CPU: float32 copies of low-precision operands
        cols = embed.astype(f32) @ hidden[:, 0].T.astype(f32)  # [V, B]
        return jax.lax.optimization_barrier(cols).T[:, None]

    return jax.lax.platform_dependent(hidden, embed, cpu=columns, default=lambda h, e: output_logits(h, e.T))


def einsum_f32(spec: str, a: Array, b: Array) -> Array:
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


def output_logits(hidden: Array, out_w: Array) -> Array:
    """The output projection: hidden [..., D] @ out_w [D, V] → float32 logits [..., V]."""
    return einsum_f32("...d,dv->...v", hidden, out_w)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w_t"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TransposedWeight:
    """A layer weight w [D, F] kept as its transpose w_t [F, D], row-major
    (`Llama.unstack_layers(transposed=True)`). A decode step's products are then w_t @ h
    with activations h [D, B] (`llama._layer_columns`); a prefill's contract the minor axes of
    x [B·T, D] and w_t. For decoding's few rows, XLA's CPU library kernels run either faster
    than x @ w: SmolLM2's decode products, 30 chained layers at 16 rows on 2 cores of an Intel
    Xeon, 37–38 against 40–41 ms per token contracting minor axes (an ad-hoc probe), and
    w_t @ h faster again (`llama._layer_columns`). Making the copy costs more than that within one
    generation, so only weights kept across calls use it (`Sampler.decode_layers`)."""
    w_t: Array

    def astype(self, dtype) -> "TransposedWeight":
        return TransposedWeight(self.w_t.astype(dtype))


def _dot_nt(x: Array, w_t: Array, preferred_element_type=None) -> Array:
    """x [..., K] · w_t [N, K]ᵀ → [..., N]."""
    return jax.lax.dot_general(x, w_t, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=preferred_element_type)


def dot_f32(x: Array, w) -> Array:
    """x [..., K] @ w [K, N] (or a TransposedWeight) with float32 results (a low-precision
    product should get row-major operands: `transposed`, `logprobs._output_operands`)."""
    if isinstance(w, TransposedWeight):
        return _dot_nt(x, w.w_t, None if x.dtype == w.w_t.dtype == jnp.float32 else jnp.float32)
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return x @ w
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def rounded_matmul(x: Array, w: Array) -> Array:
    """x @ w in x's dtype, a low-precision product made with float32 results and rounded
    once; no backward of its own (`matmul` is the differentiable face; `swiglu` writes its
    own). Unlike `einsum_f32` it keeps preferred_element_type on CPU: these plain 2-D
    products go to XLA's library kernels, which take BF16 x BF16 -> F32 (bfloat16 trainer
    steps on one device and on a 2 x 2 x 2 mesh in tests/test_sharding.py)."""
    return dot_f32(x, w).astype(x.dtype)


def transposed(x: Array) -> Array:
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


def matmul(x: Array, w) -> Array:
    """x [..., D] @ w [D, F] in x's dtype; low-precision operands through `low_matmul`.
    A TransposedWeight (cached decoding, never differentiated) through `rounded_matmul`."""
    if isinstance(w, TransposedWeight):
        return rounded_matmul(x, w)
    return x @ w if x.dtype == jnp.float32 else low_matmul(x, w)


@jax.custom_vjp
def low_matmul(x: Array, w: Array) -> Array:
    """x @ w for bfloat16 operands, multiplied with float32 results and rounded once. XLA
    on CPU runs a bfloat16 -> bfloat16 product as a float32 dot of converted copies; asked
    for a float32 result it keeps the operands bfloat16 (AMX on Intel CPUs that have it).
    The backward pass is autodiff's for x @ w, its products likewise (autodiff's transpose
    of a float32-result product would multiply a float32 cotangent by bfloat16 weights)."""
    return rounded_matmul(x, w)


def _low_matmul_fwd(x, w):
    return rounded_matmul(x, w), (x, w)


def _low_matmul_bwd(residuals, g):
    x, w = residuals
    d_w = rounded_matmul(transposed(x.reshape(-1, x.shape[-1])), g.reshape(-1, g.shape[-1]))
    return rounded_matmul(g, transposed(w)), d_w.astype(w.dtype)


low_matmul.defvjp(_low_matmul_fwd, _low_matmul_bwd)


def rounded_cols(w_t: Array, h_cols: Array) -> Array:
    """w_t [N, K] @ h_cols [K, B] in h_cols' dtype (float32 results, rounded once)."""
    if w_t.dtype == h_cols.dtype == jnp.float32:
        return w_t @ h_cols
    return jnp.dot(w_t, h_cols, preferred_element_type=jnp.float32).astype(h_cols.dtype)


def blocks_matmul(x: Array, w, product=matmul) -> Array:
    """x [..., D] @ w [D, F] by `product`, w an array (or TransposedWeight) or a tuple of its
    column blocks (their products, concatenated)."""
    if isinstance(w, tuple):
        return jnp.concatenate([product(x, block) for block in w], axis=-1)
    return product(x, w)


@jax.custom_vjp
def swiglu(h: Array, w_gate: Array, w_up: Array, w_down: Array) -> Array:
    """SwiGLU MLP on h [..., D]: (silu(h·W_gate) ⊙ h·W_up)·W_down. Its backward is written
    out (`_swiglu_bwd`) for the layout of the weights' gradients, not for different maths."""
    return swiglu_fwd(h, w_gate, w_up, w_down)[0]  # residuals unused here: XLA drops them


def swiglu_fwd(h, w_gate, w_up, w_down):
    gate, up = rounded_matmul(h, w_gate), rounded_matmul(h, w_up)
    return blocks_matmul(jax.nn.silu(gate) * up, w_down, rounded_matmul), (h, gate, up, w_gate, w_up, w_down)


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
    d_hidden = rounded_matmul(g2, transposed(w_down))
    d_up = d_hidden * act
    d_gate = d_hidden * up2 * (sig * (1 + gate2 * (1 - sig)))
    h_t, g_t = jax.lax.optimization_barrier((transposed(h2), transposed(g2)))
    d_w_gate = rounded_matmul(h_t, d_gate).astype(w_gate.dtype)
    d_w_up = rounded_matmul(h_t, d_up).astype(w_up.dtype)
    d_w_down = rounded_matmul(g_t, act * up2).T.astype(w_down.dtype)
    d_h = rounded_matmul(d_gate, transposed(w_gate)) + rounded_matmul(d_up, transposed(w_up))
    d_h = d_h.reshape(h.shape).astype(h.dtype)
    return d_h, d_w_gate, d_w_up, d_w_down


swiglu.defvjp(swiglu_fwd, _swiglu_bwd)