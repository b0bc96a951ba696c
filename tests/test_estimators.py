import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdrl import estimators
from fdrl.losses import fdpg_loss


def test_log_z_estimator_is_unbiased_by_enumeration():
    """E over all pairs of one-sample batches x1, x2 ~ q of Ẑ equals Z exactly."""
    q = jnp.array([0.1, 0.2, 0.3, 0.4])
    log_P = jnp.log(jnp.array([0.5, 0.0, 2.0, 0.01]))
    Z = float(jnp.sum(jnp.exp(log_P)))
    expected = 0.0
    for i, j in itertools.product(range(4), repeat=2):
        state = estimators.log_z_update(estimators.log_z_init(), log_P[i:i + 1], jnp.log(q[i:i + 1]))
        state = estimators.log_z_update(state, log_P[j:j + 1], jnp.log(q[j:j + 1]))
        expected += float(q[i] * q[j]) * math.exp(float(estimators.log_z_value(state)))
    assert expected == pytest.approx(Z, rel=1e-6)


def test_log_z_with_huge_and_minus_inf_weights():
    state = estimators.log_z_update(estimators.log_z_init(), jnp.array([1e4, -jnp.inf, 0.0]), jnp.zeros(3))
    value = float(estimators.log_z_value(state))
    assert value == pytest.approx(1e4 - math.log(3), rel=1e-6)
    state = estimators.log_z_update(state, jnp.array([-jnp.inf, -jnp.inf]), jnp.array([-1e4, 0.0]))
    assert float(estimators.log_z_value(state)) == pytest.approx(1e4 - math.log(5), rel=1e-6)


def test_log_z_all_violating_is_zero_and_loss_stays_finite():
    state = estimators.log_z_update(estimators.log_z_init(), jnp.full((3,), -jnp.inf), jnp.zeros(3))
    log_Z = estimators.log_z_value(state)
    assert float(log_Z) == -math.inf  # Ẑ = 0 is the exact estimate from these samples
    loss, diag = fdpg_loss("fkl", jnp.full((3,), -2.0), log_P=jnp.full((3,), -jnp.inf), log_Z=log_Z)
    assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(diag["advantage"])))
    assert float(estimators.log_z_value(estimators.log_z_init())) == 0.0


def test_baseline_kinds():
    rewards = jnp.array([1.0, 2.0, 3.0, 6.0])
    state = estimators.baseline_init(window_size=2)
    # Empty state: ema and window fall back to the batch mean.
    for kind in ("batch", "ema", "window"):
        np.testing.assert_allclose(estimators.compute_baseline(kind, state, rewards), 3.0)
    np.testing.assert_allclose(estimators.compute_baseline("none", state, rewards), 0.0)
    np.testing.assert_allclose(estimators.compute_baseline("loo", state, rewards), [11 / 3, 10 / 3, 3.0, 2.0], rtol=1e-6)
    w = jnp.array([1.0, 0.0, 1.0, 2.0])
    np.testing.assert_allclose(estimators.compute_baseline("batch", state, rewards, w), (1 + 3 + 12) / 4)
    for mean in (1.0, 2.0, 4.0):
        state = estimators.baseline_update(state, jnp.array(mean), decay=0.5)
    np.testing.assert_allclose(state.ema, 0.5 * (0.5 * 1 + 0.5 * 2) + 0.5 * 4)  # first update sets it
    np.testing.assert_allclose(estimators.compute_baseline("window", state, rewards), 3.0)  # last two: 2, 4
    with pytest.raises(ValueError, match="unknown baseline kind='median'"):
        estimators.compute_baseline("median", state, rewards)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        estimators.baseline_init(0)


def test_estimators_are_jittable_pytrees():
    state = estimators.baseline_init(3)
    update = jax.jit(estimators.baseline_update)
    for i in range(5):
        state = update(state, jnp.array(float(i)))
    assert int(state.count) == 5
    leaves = jax.tree.leaves((state, estimators.log_z_init()))
    assert all(isinstance(x, jax.Array) for x in leaves)


def test_weighted_mean_refuses_weights_of_another_shape():
    values = jnp.array([1.0, 2.0, 3.0])
    assert float(estimators.weighted_mean(values, jnp.array([0.0, 1.0, 1.0]))) == 2.5
    with pytest.raises(ValueError, match=r"values \(3,\) and weights \(3, 1\) shapes disagree"):
        estimators.weighted_mean(values, jnp.ones((3, 1)))
