"""The optimiser from config: Adam with a bfloat16 first moment."""

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
