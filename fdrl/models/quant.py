"""GGUF block-quantised weights kept quantised in memory: Q4_1 and Q8_0.

A frozen model (the reference of f-DPG and PPO) never needs its weights as
float32 arrays all at once. `Quantized` holds a weight as the GGUF file stores
it, blocks of 32 values along a row, each block a float16 scale (and, for Q4_1,
a float16 minimum) and 4- or 8-bit integers: SmolLM2-135M's weights take 0.09 GB
this way instead of 0.54 GB. The model reads a weight through `astype` (or
indexing, for the embedding's rows), which dequantises it inside the jitted
computation, one layer at a time in the layer scan.

Dequantising gives exactly the float32 values of `gguf.dequantize`: a float16
scale times an integer of at most 8 bits is exact in float32, so the one
rounding (Q4_1's `+ min`) is the same whether or not the compiler fuses it.

`Quantized` is a pytree (jit, device_put and tree maps see its integer and
float16 arrays) that answers the few array questions the model asks: shape,
dtype, ndim, astype, .T and indexing of the leading (layer or vocabulary) axes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # values per block, for both Q4_1 and Q8_0
KINDS = ("Q4_1", "Q8_0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A float32 weight [..., rows, cols] (or its transpose [..., cols, rows] when
    `transposed`) stored as blocks of 32 along cols.

    Q4_1: q uint8 [..., rows, cols/32, 16] (value i of a block in the low nibble of
          byte i, value 16 + i in the high nibble), w = scale·q + offset.
    Q8_0: q int8 [..., rows, cols/32, 32], w = scale·q, offset None.
    scale, offset: float16 [..., rows, cols/32].
    """

    q: jax.Array
    scale: jax.Array
    offset: Optional[jax.Array]
    transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def kind(self) -> str:
        return "Q8_0" if self.offset is None else "Q4_1"

    @property
    def shape(self) -> tuple:
        *lead, rows, blocks = self.scale.shape
        return (*lead, blocks * BLOCK, rows) if self.transposed else (*lead, rows, blocks * BLOCK)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(self))

    def dequantize(self) -> jax.Array:
        """The float32 weight, computed as gguf.dequantize does."""
        scale = self.scale.astype(jnp.float32)[..., None]
        if self.offset is None:
            w = self.q.astype(jnp.float32) * scale
        else:
            values = jnp.concatenate([self.q & 0x0F, self.q >> 4], axis=-1).astype(jnp.float32)
            w = scale * values + self.offset.astype(jnp.float32)[..., None]
        w = w.reshape(*w.shape[:-2], -1)
        return jnp.swapaxes(w, -1, -2) if self.transposed else w

    def astype(self, dtype) -> jax.Array:
        return self.dequantize().astype(dtype)

    @property
    def T(self) -> jax.Array:
        return self.dequantize().T

    def __getitem__(self, index):
        """`[...]` is the weight itself; other indices select along the leading axes
        (a layer of a stacked weight, rows of an embedding), which hold whole blocks."""
        if index is Ellipsis:
            return self
        index = index if isinstance(index, tuple) else (index,)
        # Non-transposed, every axis but the blocks' is leading; transposed, the rows are the
        # weight's last axis and cannot be indexed either.
        leading = self.scale.ndim - (2 if self.transposed else 1)
        if len(index) > leading or any(i is Ellipsis or i is None for i in index):
            raise IndexError(f"Quantized {self.shape} can index its first {leading} axes only, got {index}")
        return jax.tree.map(lambda a: a[index], self)


def is_quantized(x) -> bool:
    return isinstance(x, Quantized)


def from_gguf_blocks(data: np.ndarray, kind: str, rows: int, cols: int) -> Quantized:
    """A Quantized (numpy-backed) from a GGUF tensor's raw bytes [rows, cols/32 · block bytes]."""
    if kind not in KINDS:
        raise ValueError(f"unsupported GGUF quantisation {kind!r}; Quantized holds {KINDS}")
    if cols % BLOCK:
        raise ValueError(f"a quantised row has {cols} values, not a multiple of {BLOCK}")
    header = 4 if kind == "Q4_1" else 2
    blocks = np.ascontiguousarray(np.asarray(data, np.uint8).reshape(rows, cols // BLOCK, -1))
    scale = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if kind == "Q4_1":
        offset = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        return Quantized(np.ascontiguousarray(blocks[..., header:]), scale, offset)
    return Quantized(np.ascontiguousarray(blocks[..., header:]).view(np.int8), scale, None)


def dequantize_tree(tree, dtype=None):
    """Every Quantized in `tree` (an nnx State or any pytree) replaced by its dequantised
    array, cast to `dtype` when given; plain arrays are copied (fresh buffers)."""
    def leaf(x):
        x = x.dequantize() if is_quantized(x) else jnp.copy(x)
        return x if dtype is None else x.astype(dtype)
    return jax.tree.map(leaf, tree, is_leaf=is_quantized)


def float_shapes(tree):
    """`tree` with every Quantized replaced by a float32 ShapeDtypeStruct of its weight's shape
    (the abstract parameters a float model of the same architecture would have)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
                        tree, is_leaf=is_quantized)


def replicate_quantized(shardings, tree, replicated):
    """Shardings for `tree`: a float leaf keeps its sharding from `shardings` (the float
    model's), a Quantized one is `replicated` throughout (its blocks do not follow the
    float weight's layout, and it is a fraction of the size)."""
    return jax.tree.map(lambda s, x: jax.tree.map(lambda _: replicated, x) if is_quantized(x) else s,
                        shardings, tree)
