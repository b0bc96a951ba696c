import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdrl import targets, toy


def test_rlhf_potential_and_beta_check():
    np.testing.assert_allclose(targets.rlhf_log_potential(jnp.array([1.0, -2.0]), 0.5), [2.0, -4.0])
    for beta in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            targets.rlhf_log_potential(jnp.ones(2), beta)


def test_pointwise_potential_floor():
    b = jnp.array([1.0, 0.0, 0.5])
    np.testing.assert_allclose(targets.pointwise_log_potential(b), [0.0, -np.inf, math.log(0.5)])
    np.testing.assert_allclose(targets.pointwise_log_potential(b, math.log(1e-3)), [0.0, math.log(1e-3), math.log(0.5)])
    with pytest.raises(ValueError, match="log_floor is log ε"):
        targets.pointwise_log_potential(b, 1.0)


def test_fit_lambda_exact_on_enumeration():
    problem = toy.make_problem()
    target, fit = toy.distributional_target(problem, mu_bar=0.5)
    assert float(fit.max_error) < 1e-5
    # The fitted target's exact moment, recomputed from log p.
    assert float(jnp.sum(jnp.exp(target.log_p) * target.score)) == pytest.approx(0.5, abs=1e-5)


def test_fit_lambda_from_samples_and_several_moments():
    key = jax.random.PRNGKey(0)
    phi = jnp.stack([jax.random.bernoulli(key, 0.2, (5000,)),
                     jax.random.uniform(jax.random.PRNGKey(1), (5000,))], axis=1).astype(jnp.float32)
    fit = targets.fit_lambda(phi, jnp.array([0.5, 0.3]))
    assert float(fit.max_error) < 1e-4
    weights = jax.nn.softmax(phi @ fit.lam)
    np.testing.assert_allclose(weights @ phi, [0.5, 0.3], atol=1e-4)
    with pytest.raises(ValueError, match=r"mu_bar=\[1, 0.3\] must lie strictly between"):
        targets.fit_lambda(phi, jnp.array([1.0, 0.3]))
    with pytest.raises(ValueError, match="features must be"):
        targets.distributional_log_potential(phi, jnp.zeros(3))
