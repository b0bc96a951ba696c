"""The optimiser from config, and the precision policy for its state.

Parameters may be stored in bfloat16 (`config.param_dtype`, the accelerator
setting); the optimiser state never is. With low-precision parameters the
optimiser keeps a float32 master copy: gradients are cast to float32, Adam runs
on the master weights, and the parameters become the master rounded to their
dtype. Small updates (lr 1e-5 × O(1)) are far below bfloat16's resolution of a
weight (2⁻⁸ relative); without the master copy they would vanish.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class MasterState(NamedTuple):
    master: optax.Params  # float32 copy of the parameters
    inner: optax.OptState


def float32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps `inner` to run in float32 on a master copy; the returned updates move the
    (low-precision) parameters exactly onto the rounded master."""

    def to32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    def init(params):
        master = to32(params)
        return MasterState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("float32_master needs the parameters in update(grads, state, params)")
        updates, inner_state = inner.update(to32(grads), state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        # In float32, so that optax.apply_updates (p + u, then cast) lands on the rounded master.
        deltas = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32),
                              master, params)
        return deltas, MasterState(master, inner_state)

    return optax.GradientTransformation(init, update)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW (weight_decay 0 = Adam) with optional global-norm clipping; float32 master
    weights when the parameters are low precision."""
    if not config.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {config.learning_rate}")
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    adam = config.get("adam")  # absent from the toy configs: optax's Adam defaults
    b1, b2, eps, wd = (0.9, 0.999, 1e-8, 0.0) if adam is None else (adam.b1, adam.b2, adam.eps, adam.weight_decay)
    optimizer = optax.chain(*parts, optax.adamw(config.learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=wd))
    if jnp.dtype(config.get("param_dtype", "float32")) != jnp.float32:
        optimizer = float32_master(optimizer)
    return optimizer
