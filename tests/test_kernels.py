"""The decoder's products (fdrl/models/kernels.py): the hand-written backward passes equal
autodiff's, bfloat16 products round once, stay finite at extreme operands and keep bfloat16
operands on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdrl.models import kernels
from hlo_dots import hlo_dots


@pytest.mark.parametrize("dtype,scale", [(jnp.float32, 1.0), (jnp.float32, 100.0), (jnp.bfloat16, 1.0)])
def test_swiglu_backward_equals_autodiff(dtype, scale):
    """The MLP's hand-written backward (weights' gradients from transposed [B·T, D] factors)
    against autodiff of the same formula; at gate pre-activations of ±1e3 (scale 100) the
    gradients stay finite."""
    kh, kg, ku, kd, kc = jax.random.split(jax.random.PRNGKey(0), 5)
    h = (scale * jax.random.normal(kh, (3, 5, 8))).astype(dtype)
    w_gate, w_up = (jax.random.normal(k, (8, 12)).astype(dtype) for k in (kg, ku))
    w_down = jax.random.normal(kd, (12, 8)).astype(dtype)
    cotangent = jax.random.normal(kc, (3, 5, 8)).astype(dtype)

    def plain(h, w_gate, w_up, w_down):
        return (jax.nn.silu(h @ w_gate) * (h @ w_up)) @ w_down

    out, vjp = jax.vjp(plain, h, w_gate, w_up, w_down)
    got_out, got_vjp = jax.vjp(jax.jit(kernels.swiglu), h, w_gate, w_up, w_down)
    # Round-off relative to each array's largest entry: float32's, or bfloat16's 2^-8, where
    # sums of two large terms that cancel are exact to that only.
    eps = 1e-6 if dtype == jnp.float32 else 2e-2
    pairs = [(got_out, out)] + list(zip(jax.jit(got_vjp)(cotangent), vjp(cotangent)))
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=0, atol=eps * np.abs(b).max())


@pytest.mark.parametrize("scale", [1.0, 1e17])
def test_bfloat16_matmul_rounds_once_and_differentiates_as_autodiff(scale):
    """The layers' bfloat16 products (float32 results rounded once, for the CPU's bfloat16
    kernels) equal the float32 product rounded to bfloat16, and their backward pass is
    autodiff's of x @ w; float32 operands take the plain product. At operands of ±1e17
    (products near 1e34, within bfloat16's range) everything stays finite."""
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x = (scale * jax.random.normal(kx, (3, 5, 8))).astype(jnp.bfloat16)
    w = (scale * jax.random.normal(kw, (8, 12))).astype(jnp.bfloat16)
    cotangent = jax.random.normal(kc, (3, 5, 12)).astype(jnp.bfloat16)
    out, vjp = jax.vjp(jax.jit(kernels.matmul), x, w)
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    assert out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(exact)) and np.all(np.isfinite(np.asarray(out, np.float32)))
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2 ** -8, atol=1e-6)
    _, plain_vjp = jax.vjp(lambda x, w: x @ w, x, w)
    for a, b in zip(jax.jit(vjp)(cotangent), plain_vjp(cotangent)):
        assert a.dtype == b.dtype == jnp.bfloat16 and a.shape == b.shape
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2 ** -7, atol=1e-6)
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    np.testing.assert_array_equal(kernels.matmul(x32, w32), x32 @ w32)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU compiler is the one that upcasts")
@pytest.mark.parametrize("fn,shapes,products", [
    (kernels.matmul, [(4, 63, 48), (48, 96)], 2),  # the backward's two
    (kernels.swiglu, [(4, 63, 48), (48, 96), (48, 96), (96, 48)], 8)])  # gate and up (residuals), 6 backward
def test_bfloat16_backward_products_stay_bfloat16_on_cpu(fn, shapes, products):
    """The backward passes' products of bfloat16 layers take bfloat16 operands on CPU
    (kernels.transposed): XLA on CPU makes a product with a transposed bfloat16 operand a
    float32 product of converted copies, at a fraction of the bfloat16 rate on AMX."""
    args = [jax.random.normal(jax.random.PRNGKey(i), s).astype(jnp.bfloat16) for i, s in enumerate(shapes)]
    cotangent = jnp.ones(jax.eval_shape(fn, *args).shape, jnp.bfloat16)
    backward = jax.jit(lambda *a: jax.vjp(fn, *a)[1](cotangent))
    dots = hlo_dots(backward.lower(*args).compile().as_text())
    # bfloat16 operands, and a plain [M, K] × [K, N] (XLA on CPU upcasts or slows down others)
    assert dots == [(["bf16"], "1", "0")] * products, dots


