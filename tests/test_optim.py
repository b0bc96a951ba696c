"""The optimiser from config: Adam with a bfloat16 first moment, and the step-size schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fdrl import optim


def _grads(i):
    k1, k2 = jax.random.split(jax.random.PRNGKey(i))
    return {"w": jax.random.normal(k1, (4, 3)), "b": 1e-3 * jax.random.normal(k2, (3,))}


def _run(transform, steps=4):
    params = _grads(100)
    state = transform.init(params)
    out = []
    for i in range(steps):
        updates, state = transform.update(_grads(i), state, params)
        out.append(updates)
    return out, state


def test_stored_mu_in_float32_is_optax_adam():
    ours, _ = _run(optim.scale_by_adam_stored_mu(0.9, 0.999, 1e-8, jnp.float32))
    theirs, _ = _run(optax.scale_by_adam(0.9, 0.999, 1e-8))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=2e-5)  # float32 order of operations


def test_bfloat16_first_moment_steps_from_the_stored_moment():
    ours, state = _run(optim.scale_by_adam_stored_mu(0.9, 0.999, 1e-8, jnp.bfloat16))
    theirs, ref_state = _run(optax.scale_by_adam(0.9, 0.999, 1e-8))
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32
    np.testing.assert_allclose(state.nu["w"], ref_state.nu["w"], rtol=1e-6)
    # The last step is exactly the stored (rounded) moment over the float32 second moment.
    count = int(state.count)
    expected = (state.mu["w"].astype(jnp.float32) / (1 - 0.9**count)) / (jnp.sqrt(state.nu["w"] / (1 - 0.999**count))
                                                                         + 1e-8)
    np.testing.assert_allclose(ours[-1]["w"], expected, rtol=5e-5)  # not the unrounded moment: up to 2⁻⁹ off
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):  # bfloat16 rounding of mu, compounded
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("mu_dtype,expected", [("", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_make_optimizer_reads_mu_dtype(mu_dtype, expected):
    config = ml_collections.ConfigDict(dict(learning_rate=1e-3, grad_clip=1.0, adam=dict(
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, mu_dtype=mu_dtype)))
    optimizer = optim.make_optimizer(config)
    params = _grads(0)
    state = optimizer.init(params)
    moments = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
    assert len(moments) == 1 and moments[0].mu["w"].dtype == expected
    updates, _ = optimizer.update(_grads(1), state, params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_schedule_values_exactly():
    lr, steps, warm = 1e-3, 10, 4
    const = optim.learning_rate_schedule(lr, "constant", warm, steps)
    linear = optim.learning_rate_schedule(lr, "linear", warm, steps)
    cosine = optim.learning_rate_schedule(lr, "cosine", warm, steps)
    ks = np.arange(steps)
    warmup = np.minimum(1.0, (ks + 1) / warm)  # the first step already moves: lr/4
    decay = np.clip((ks - warm) / (steps - warm), 0, 1)
    np.testing.assert_allclose([const(k) for k in ks], lr * warmup, rtol=1e-6)
    np.testing.assert_allclose([linear(k) for k in ks], lr * warmup * (1 - decay), rtol=1e-6)
    np.testing.assert_allclose([cosine(k) for k in ks], lr * warmup * 0.5 * (1 + np.cos(np.pi * decay)),
                               rtol=1e-5, atol=1e-12)
    assert float(linear(steps)) == 0.0 and float(const(1000)) == pytest.approx(lr)
    # PPO makes several updates per training step: the schedule counts training steps.
    ppo = optim.learning_rate_schedule(lr, "linear", warm, steps, updates_per_step=4)
    np.testing.assert_allclose([ppo(c) for c in range(4 * steps)], np.repeat(lr * warmup * (1 - decay), 4),
                               rtol=1e-6)


def _config(**kw):
    base = dict(learning_rate=1e-2, grad_clip=0.0, steps=10, algo="fdpg",
                adam=dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, mu_dtype=""))
    return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize("mu_dtype", ["", "bfloat16"])
def test_warmup_scales_adams_first_updates(mu_dtype):
    """Adam's first update is −lr·sign(g) in every coordinate; with a 4-step warm-up the
    first two are a quarter and a half of that."""
    config, plain_config = _config(warmup_steps=4, lr_schedule="constant"), _config()
    config.adam.mu_dtype = plain_config.adam.mu_dtype = mu_dtype
    optimizer, plain = optim.make_optimizer(config), optim.make_optimizer(plain_config)
    params = _grads(0)
    state, plain_state = optimizer.init(params), plain.init(params)
    for k in range(6):
        g = _grads(1)  # the same gradient every step: every Adam step is -lr·sign(g) exactly
        updates, state = optimizer.update(g, state, params)
        plain_updates, plain_state = plain.update(g, plain_state, params)
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(plain_updates)):
            np.testing.assert_allclose(u, min(1.0, (k + 1) / 4) * p, rtol=1e-5)
        # bfloat16's rounding of the moment: ≤ 2⁻⁸ of it, compounded over the steps
        np.testing.assert_allclose(plain_updates["w"], -1e-2 * np.sign(g["w"]), rtol=1e-2 if mu_dtype else 1e-4)


def test_ppo_counts_training_steps():
    config = _config(algo="ppo", lr_schedule="linear", warmup_steps=0,
                     ppo=dict(epochs=2, minibatches=3))
    assert optim.updates_per_step(config) == 6
    toy = ml_collections.ConfigDict(dict(algo="fppo", ppo_epochs=2, ppo_minibatches=2))
    assert optim.updates_per_step(toy) == 4
    assert optim.updates_per_step(_config()) == 1


@pytest.mark.parametrize("kw,match", [
    (dict(lr_schedule="cosin"), "unknown lr_schedule='cosin'"),
    (dict(warmup_steps=-1), "warmup_steps=-1 must be an integer >= 0"),
    (dict(lr_schedule="linear", warmup_steps=10), "needs steps > warmup_steps"),
])
def test_bad_schedule_is_named(kw, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(_config(**kw))
