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

from fdrl.config_checks import check_choice, check_float_dtype, check_int, check_number


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


def scale_by_adam_stored_mu(b1: float, b2: float, eps: float, mu_dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam with the first moment kept in `mu_dtype` (e.g. bfloat16: half its
    memory) and the step taken from the moment as stored, rounded, rather than from its
    float32 value before rounding as optax does. The difference is ≤ 2⁻⁹ of the moment;
    what it buys is memory: XLA otherwise holds the unrounded moment, a float32 copy of
    every parameter, between making it and using it. The second moment stays float32
    (an average of squares with b2 = 0.999 moves by less than bfloat16 can resolve)."""
    mu_dtype = jnp.dtype(mu_dtype)

    def init(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype), params),
                                      nu=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        bc1 = 1 - jnp.asarray(b1, jnp.float32) ** count
        bc2 = 1 - jnp.asarray(b2, jnp.float32) ** count
        mu = jax.tree.map(lambda g, m: (b1 * m.astype(jnp.float32) + (1 - b1) * g).astype(mu_dtype),
                          grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), grads, state.nu)
        steps = jax.tree.map(lambda m, v, g: ((m.astype(jnp.float32) / bc1) / (jnp.sqrt(v / bc2) + eps)).astype(g.dtype),
                             mu, nu, grads)
        return steps, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


LR_SCHEDULES = ("constant", "linear", "cosine")


def learning_rate_schedule(learning_rate: float, schedule: str = "constant", warmup_steps: int = 0,
                           total_steps: int = 0, updates_per_step: int = 1) -> optax.Schedule:
    """The step size of the updates of training step k (k = 0 for the first; PPO makes
    `updates_per_step` updates in each): learning_rate·(k+1)/warmup_steps for k <
    warmup_steps (so the first step already moves, unlike a warm-up from 0), then constant,
    or decayed towards 0 at k = total_steps linearly or along a half cosine.

    Adam's first updates are ±lr in nearly every coordinate whatever the gradient's size
    (its second moment is one squared gradient), so on a small noisy batch they move a
    pretrained model far in a random direction; a warm-up shrinks those updates."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule={schedule!r}; choose one of {LR_SCHEDULES}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "constant" and total_steps <= warmup_steps:
        raise ValueError(f"lr_schedule={schedule!r} decays from step warmup_steps={warmup_steps} to 0 at "
                         f"steps={total_steps}: it needs steps > warmup_steps")

    def rate(count):  # count: updates applied so far
        k = jnp.floor(jnp.asarray(count, jnp.float32) / updates_per_step)
        warm = jnp.minimum(1.0, (k + 1.0) / warmup_steps) if warmup_steps else 1.0
        if schedule == "constant":
            return learning_rate * warm
        frac = jnp.clip((k - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        decay = 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return learning_rate * warm * decay

    return rate


def updates_per_step(config) -> int:
    """Optimiser updates in one training step: PPO's epochs × minibatches, else 1."""
    if config.get("algo", "fdpg") not in ("ppo", "fppo"):
        return 1
    if "ppo" in config:  # the LM configs
        return config.ppo.epochs * config.ppo.minibatches
    return config.ppo_epochs * config.ppo_minibatches  # configs/toy.py


def check_config(config) -> None:
    """Raises ValueError naming the first bad optimiser field of an LM or a toy config."""
    check_number(config, "learning_rate", low=0, low_open=True)
    check_number(config, "grad_clip", low=0)
    # Absent schedule fields mean make_optimizer's defaults (a constant rate).
    for field, check in (("lr_schedule", lambda f: check_choice(config, f, LR_SCHEDULES)),
                         ("warmup_steps", lambda f: check_int(config, f, low=0)),
                         ("steps", lambda f: check_int(config, f, low=0))):
        if field in config:
            check(field)
    learning_rate_schedule(config.learning_rate, config.get("lr_schedule", "constant"),
                           config.get("warmup_steps", 0), config.get("steps", 0))
    if "adam" in config:  # the LM configs
        check_number(config, "adam.b1", low=0, high=1, high_open=True)
        check_number(config, "adam.b2", low=0, high=1, high_open=True)
        check_number(config, "adam.eps", low=0, low_open=True)  # 0 divides 0 by 0 where a gradient is 0
        check_number(config, "adam.weight_decay", low=0)
        check_float_dtype(config, "adam.mu_dtype", allow_empty=True)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW (weight_decay 0 = Adam) with optional global-norm clipping, the step size from
    `learning_rate_schedule` (config.lr_schedule, config.warmup_steps, config.steps); float32
    master weights when the parameters are low precision."""
    check_config(config)
    schedule, warmup = config.get("lr_schedule", "constant"), config.get("warmup_steps", 0)
    # A constant rate stays a float: optax then keeps no step count in the optimiser state.
    lr = config.learning_rate if (schedule, warmup) == ("constant", 0) else learning_rate_schedule(
        config.learning_rate, schedule, warmup, config.steps, updates_per_step(config))
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    adam = config.get("adam")  # absent from the toy configs: optax's Adam defaults
    b1, b2, eps, wd = (0.9, 0.999, 1e-8, 0.0) if adam is None else (adam.b1, adam.b2, adam.eps, adam.weight_decay)
    mu_dtype = None if adam is None else adam.get("mu_dtype") or None
    if mu_dtype is None:
        adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    else:
        adamw = optax.chain(scale_by_adam_stored_mu(b1, b2, eps, mu_dtype),
                            optax.add_decayed_weights(wd) if wd else optax.identity(),
                            optax.scale_by_learning_rate(lr))
    optimizer = optax.chain(*parts, adamw)
    if jnp.dtype(config.get("param_dtype", "float32")) != jnp.float32:
        optimizer = float32_master(optimizer)
    return optimizer
