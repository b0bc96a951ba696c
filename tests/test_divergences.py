import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdrl import divergences

ALL = ["fkl", "rkl", "js", "tv", "chi2_pearson", "chi2_neyman", "hellinger",
       "alpha=0.5", "alpha=-0.5", "alpha=1.5", "alpha=0", "alpha=1"]
T = jnp.array([0.01, 0.1, 0.3, 0.7, 0.9, 1.2, 2.0, 5.0, 30.0])


def random_dist(key, n, temperature=1.0):
    return jax.nn.log_softmax(temperature * jax.random.normal(key, (n,)))


@pytest.mark.parametrize("name", ALL)
def test_f_of_one_is_zero(name):
    assert abs(float(divergences.get_divergence(name).f(jnp.array(1.0)))) < 1e-7


@pytest.mark.parametrize("name", ALL)
def test_f_is_convex(name):
    f = divergences.get_divergence(name).f
    t = jnp.linspace(0.05, 20.0, 400)
    mid = f((t[:-2] + t[2:]) / 2)
    chord = (f(t[:-2]) + f(t[2:])) / 2
    assert bool(jnp.all(mid <= chord + 1e-5))


@pytest.mark.parametrize("name", ALL)
def test_f_prime_of_log_t_is_grad_of_f(name):
    div = divergences.get_divergence(name)
    t = T[T != 1.0]
    autodiff = jax.vmap(jax.grad(div.f))(t)
    np.testing.assert_allclose(div.f_prime(jnp.log(t)), autodiff, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_exact_divergence_is_expectation_of_f(name):
    """Σ p f(π/p), computed naively from the generator, on full-support distributions."""
    div = divergences.get_divergence(name)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    log_pi, log_p = random_dist(k1, 50), random_dist(k2, 50)
    naive = jnp.sum(jnp.exp(log_p) * div.f(jnp.exp(log_pi - log_p)))
    np.testing.assert_allclose(divergences.exact_divergence(div, log_pi, log_p), naive, rtol=1e-5)
    assert float(divergences.exact_divergence(div, log_p, log_p)) < 1e-6


def test_closed_forms_and_bounds():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    log_pi, log_p = random_dist(k1, 30, 3.0), random_dist(k2, 30, 3.0)
    pi, p = np.exp(np.asarray(log_pi, np.float64)), np.exp(np.asarray(log_p, np.float64))
    m = (pi + p) / 2
    closed = {
        "fkl": np.sum(p * np.log(p / pi)),
        "rkl": np.sum(pi * np.log(pi / p)),
        "js": 0.5 * np.sum(pi * np.log(pi / m)) + 0.5 * np.sum(p * np.log(p / m)),
        "tv": 0.5 * np.sum(np.abs(pi - p)),
        "chi2_pearson": np.sum((pi - p) ** 2 / p),
        "chi2_neyman": np.sum((p - pi) ** 2 / pi),
        "hellinger": np.sum((np.sqrt(pi) - np.sqrt(p)) ** 2),
    }
    for name, value in closed.items():
        np.testing.assert_allclose(divergences.exact_divergence(name, log_pi, log_p), value, rtol=1e-4, err_msg=name)
    assert closed["js"] <= math.log(2) and closed["tv"] <= 1


def test_disjoint_supports_hit_the_bounds_and_infinities():
    log_pi = jnp.log(jnp.array([0.5, 0.5, 0.0, 0.0]))
    log_p = jnp.log(jnp.array([0.0, 0.0, 0.25, 0.75]))
    ex = lambda name: float(divergences.exact_divergence(name, log_pi, log_p))
    assert ex("js") == pytest.approx(math.log(2), rel=1e-6)
    assert ex("tv") == pytest.approx(1.0, rel=1e-6)
    assert ex("hellinger") == pytest.approx(2.0, rel=1e-6)
    assert ex("fkl") == math.inf and ex("rkl") == math.inf
    assert ex("alpha=0.5") == pytest.approx(4.0, rel=1e-6)  # Σ (απ + (1−α)p)/(α(1−α)) = 2·Σ(π + p)


def test_zero_mass_where_other_has_mass_is_finite_when_it_should_be():
    log_pi = jnp.log(jnp.array([0.5, 0.5, 0.0]))
    log_p = jnp.log(jnp.array([0.4, 0.4, 0.2]))
    assert math.isfinite(float(divergences.exact_divergence("rkl", log_pi, log_p)))
    assert float(divergences.exact_divergence("fkl", log_pi, log_p)) == math.inf
    grad = jax.grad(lambda lp: divergences.exact_divergence("rkl", lp, log_p))(log_pi)
    assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("eps, limit", [(1e-3, "fkl"), (1 - 1e-3, "rkl")])
def test_alpha_limits(eps, limit):
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    log_pi, log_p = random_dist(k1, 40), random_dist(k2, 40)
    np.testing.assert_allclose(divergences.exact_divergence(f"alpha={eps}", log_pi, log_p),
                               divergences.exact_divergence(limit, log_pi, log_p), rtol=5e-3)


def test_bad_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown f-divergence f='kl'"):
        divergences.get_divergence("kl")
    with pytest.raises(ValueError, match="needs a value"):
        divergences.get_divergence("alpha")
    with pytest.raises(ValueError, match="alpha=oops"):
        divergences.get_divergence("alpha=oops")
    with pytest.raises(ValueError, match="shapes disagree"):
        divergences.exact_divergence("js", jnp.zeros(3), jnp.zeros(4))
    assert divergences.get_divergence("alpha", alpha=0.3).name == "alpha=0.3"
