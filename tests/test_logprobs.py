"""Completions' log-probs and their hand-written gradients (fdrl.models.logprobs) against
log-softmax and autodiff on the tiny random model: teacher forcing, from the sampler's
states, a layer at a time into float32 sums, and at the extremes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdrl.models import llama, logprobs
from hlo_dots import hlo_dots


def test_continuation_logp_matches_log_softmax(tiny_llama):
    _, graphdef, params = tiny_llama
    prompt = jnp.array([[0, 5, 6], [7, 8, 9]])
    prompt_valid = jnp.array([[False, True, True], [True, True, True]])
    completion = jnp.array([[10, 11], [12, 13]])
    mask = jnp.array([[True, False], [True, True]])
    logp, values = logprobs.continuation_logp(graphdef, params, prompt, prompt_valid, completion, mask)
    full = llama.forward(graphdef, params, jnp.concatenate([prompt, completion], 1),
                         jnp.concatenate([prompt_valid, mask], 1))
    ref = jax.nn.log_softmax(full.logits, -1)
    np.testing.assert_allclose(logp[1, 1], ref[1, 3, 13], atol=1e-5)
    assert float(logp[0, 1]) == 0.0 and values.shape == (2, 2)


@pytest.mark.parametrize("field,value", [("remat", True), ("remat", "dots"), ("remat", "none"),
                                         ("unroll_layers", True), ("logits_chunk", 4), ("logits_chunk", 6)])
def test_layouts_of_the_computation_give_the_same_gradients(tiny_llama, field, value):
    """remat policies, an unrolled layer scan and chunked logits (batch 3: chunks of 1 and of 2
    positions, the last one padded) change how the work is done, not its result."""
    import dataclasses

    config, graphdef, params = tiny_llama
    other = nnx.split(nnx.eval_shape(lambda: llama.Llama(dataclasses.replace(config, **{field: value}),
                                                         rngs=nnx.Rngs(0))))[0]
    prompt = jax.random.randint(jax.random.PRNGKey(1), (3, 4), 0, config.vocab_size)
    completion = jax.random.randint(jax.random.PRNGKey(2), (3, 5), 0, config.vocab_size)
    ones = lambda x: jnp.ones(x.shape, bool)  # noqa: E731

    def loss(g, p):
        return jnp.sum(logprobs.continuation_logp(g, p, prompt, ones(prompt), completion, ones(completion))[0])

    expected = jax.grad(functools.partial(loss, graphdef))(params)
    got = jax.jit(jax.grad(functools.partial(loss, other)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,scale", [(jnp.float32, 1.0), (jnp.float32, 300.0), (jnp.bfloat16, 1.0)])
def test_output_projection_backward_equals_autodiff(dtype, scale):
    """chunked_token_logp's hand-written backward (one elementwise pass over the logits, both
    projections' gradients at once) against autodiff of the plain log-softmax; at logits
    of ±1e3 (scale 300) the gradients stay finite."""
    kh, kw, kt, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = (scale * jax.random.normal(kh, (3, 5, 8))).astype(dtype)
    out_w = jax.random.normal(kw, (8, 11)).astype(dtype)
    targets = jax.random.randint(kt, (3, 5), 0, 11)
    weights = jax.random.normal(kg, (3, 5)) * (jax.random.uniform(kg, (3, 5)) > 0.3)  # zeros: masked tokens

    def plain(h, w):
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        return jnp.sum(weights * llama.token_logp_from_logits(logits, targets))

    def ours(h, w, chunk):
        return jnp.sum(weights * logprobs.chunked_token_logp(h, w, targets, chunk))

    expected = jax.grad(plain, argnums=(0, 1))(hidden, out_w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for chunk in (0, 6):
        got = jax.jit(jax.grad(ours, argnums=(0, 1)), static_argnums=2)(hidden, out_w, chunk)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype
            assert np.all(np.isfinite(np.asarray(a, np.float32)))
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU compiler is the one that upcasts")
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_bfloat16_output_projection_products_stay_bfloat16_on_cpu(scale):
    """The policy update's output projection (logprobs._token_logp_grads: logits, and both
    gradients) multiplies row-major bfloat16 operands for a bfloat16 model on CPU (a
    transposed operand ran 7% slower in SmolLM2's policy update), and its gradients
    equal those of the float32 computation on the same bfloat16 values to round-off; at
    logits in the thousands (scale 100) they stay finite."""
    kh, kw, kt, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = (scale * jax.random.normal(kh, (4, 32, 64))).astype(jnp.bfloat16)
    embed = jax.random.normal(kw, (512, 64)).astype(jnp.bfloat16)  # tied, as SmolLM2's: out_w = embed.T
    out_w = embed.T
    targets = jax.random.randint(kt, (4, 32), 0, 512)
    g = jax.random.normal(kg, (4, 32))
    grads = jax.jit(lambda h, e, t, g: logprobs._token_logp_grads(h, e.T, t, g, 0))
    dots = hlo_dots(grads.lower(hidden, embed, targets, g).compile().as_text())
    assert dots == [(["bf16"], "1", "0")] * 3, dots  # logits and both gradients
    exact = jax.grad(lambda h, w: jnp.sum(g * llama.token_logp_from_logits(h @ w, targets)), argnums=(0, 1))(
        hidden.astype(jnp.float32), out_w.astype(jnp.float32))
    for got, want in zip(grads(hidden, embed, targets, g), exact):
        got = np.asarray(got, np.float32)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("chunk", [0, 4])
def test_gradient_from_sampler_states_equals_teacher_forcing(chunk):
    """continuation_logp_from_states: the sampler's log-probs as values, and the gradient
    of teacher forcing's log-probs (autodiff through continuation_logp) to round-off."""
    from fdrl.sampling import Sampler

    config = llama.LlamaConfig.tiny(logits_chunk=chunk)
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    embed = params["embed"][...]
    params["embed"].value = embed.at[3].set(embed[3] + 0.5 * jnp.sign(embed.mean(0)))  # EOS (3) likely
    sampler = Sampler(graphdef, config, max_new_tokens=9, eos_id=3, pad_id=0, buckets=(8,), keep_states=True)
    prompt, valid = sampler.pad([[5, 6, 7], [8, 9, 10, 11, 12], [4], [6, 6]])
    out = sampler(params, prompt, valid, jax.random.PRNGKey(4))
    assert 0 < int(out.mask.sum()) < out.mask.size
    weights = jax.random.normal(jax.random.PRNGKey(5), out.mask.shape)

    def forced(p):
        return jnp.sum(weights * logprobs.continuation_logp(graphdef, p, prompt, valid, out.tokens, out.mask)[0])

    def from_states(p):
        return jnp.sum(weights * logprobs.continuation_logp_from_states(graphdef, p, prompt, valid, out.tokens,
                                                                     out.mask, out.states, out.logp))

    value, grads = jax.value_and_grad(forced)(params)
    value_s, grads_s = jax.jit(jax.value_and_grad(from_states))(params)
    np.testing.assert_allclose(value_s, value, atol=1e-4)
    for (path, g), g_s in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_s)):
        assert float(jnp.abs(g).max()) > 0, path
        np.testing.assert_allclose(g_s, g, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match=r"states \(4, 3"):
        logprobs.continuation_logp_from_states(graphdef, params, prompt, valid, out.tokens, out.mask,
                                            out.states[:, :, 1:], out.logp)
    with pytest.raises(ValueError, match="token_logp"):
        logprobs.continuation_logp_from_states(graphdef, params, prompt, valid, out.tokens, out.mask, out.states,
                                            out.logp[:, 1:])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "lm_head"])
def test_accumulated_gradient_adds_teacher_forcings(tied):
    """accumulate_continuation_grads: into + the gradient of Σ c · token_logp (autodiff through
    continuation_logp) to round-off, for each parameter; twice from zero is twice the gradient."""
    config = llama.LlamaConfig.tiny(logits_chunk=4, tie_embeddings=tied)
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    prompt = jnp.array([[0, 5, 6, 7], [8, 9, 10, 11], [0, 0, 0, 4]])
    valid = prompt != 0
    completion = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 1, config.vocab_size)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), mask.shape)
    grads = jax.grad(lambda p: jnp.sum(cotangent * logprobs.continuation_logp(
        graphdef, p, prompt, valid, completion, mask)[0]))(params)
    into = jax.tree.map(lambda g: jax.random.normal(jax.random.PRNGKey(3), g.shape), grads)
    accumulate = jax.jit(functools.partial(logprobs.accumulate_continuation_grads, graphdef))
    total = accumulate(params, prompt, valid, completion, mask, cotangent, into)
    twice = accumulate(params, prompt, valid, completion, mask, cotangent,
                       accumulate(params, prompt, valid, completion, mask, cotangent,
                                  jax.tree.map(jnp.zeros_like, grads)))
    for (path, g), start, t, t2 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(into),
                                       jax.tree.leaves(total), jax.tree.leaves(twice)):
        assert float(jnp.abs(g).max()) > 0, path
        np.testing.assert_allclose(t - start, g, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
        np.testing.assert_allclose(t2, 2 * g, atol=4e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match=r"token_cotangent \(3, 4\) must be \[B, N\]"):
        logprobs.accumulate_continuation_grads(graphdef, params, prompt, valid, completion, mask, cotangent[:, 1:], into)


@pytest.mark.parametrize("tied, value_head", [(True, True), (False, True), (True, False)],
                         ids=["tied-value-head", "lm_head-value-head", "no-value-head"])
def test_accumulated_loss_gradient_adds_autodiffs(tied, value_head):
    """accumulate_loss_grads: into + autodiff's gradient of a loss that is not linear in the
    log-probs (a PPO-like clipped ratio, plus a squared value error where the model has a
    value head), for each parameter, and the loss and aux of continuation_logp's values."""
    config = llama.LlamaConfig.tiny(logits_chunk=4, tie_embeddings=tied, value_head=value_head)
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(4), x.shape), params)
    prompt = jnp.array([[0, 5, 6, 7], [8, 9, 10, 11], [0, 0, 0, 4]])
    valid = prompt != 0
    completion = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 1, config.vocab_size)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
    old = jax.random.normal(jax.random.PRNGKey(2), mask.shape) - 4.0
    target = jax.random.normal(jax.random.PRNGKey(5), mask.shape)

    def loss_fn(tok, values):
        ratio = jnp.exp(jnp.where(mask, tok - old, 0.0))
        loss = -jnp.sum(jnp.minimum(ratio * target, jnp.clip(ratio, 0.8, 1.2) * target) * mask)
        if values is not None:
            loss = loss + jnp.sum(jnp.where(mask, (values - target) ** 2, 0.0))
        return loss, jnp.max(ratio)

    (loss, aux), grads = jax.value_and_grad(
        lambda p: loss_fn(*logprobs.continuation_logp(graphdef, p, prompt, valid, completion, mask)), has_aux=True)(params)
    into = jax.tree.map(lambda g: jax.random.normal(jax.random.PRNGKey(3), g.shape), grads)
    total, (acc_loss, acc_aux) = jax.jit(lambda p, i: logprobs.accumulate_loss_grads(
        graphdef, p, prompt, valid, completion, mask, loss_fn, i))(params, into)
    assert float(acc_loss) == pytest.approx(float(loss), rel=1e-5)
    assert float(acc_aux) == pytest.approx(float(aux), rel=1e-5) and float(aux) > 1.2  # some ratios are clipped
    for (path, g), start, t in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(into),
                                   jax.tree.leaves(total)):
        assert float(jnp.abs(g).max()) > 0, path
        np.testing.assert_allclose(t - start, g, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    if not value_head:
        with pytest.raises(ValueError, match="value_cotangent given, but the model has no value head"):
            logprobs._grads_from_states(graphdef, params, prompt, valid, completion, mask,
                                     logprobs._teacher_forced_states(graphdef, params, prompt, valid, completion, mask),
                                     jnp.ones(mask.shape), value_cotangent=jnp.ones(mask.shape))


def test_gradient_from_sampler_states_stays_finite_at_extreme_logits():
    """Logits up to ~700 in size (embedding × 1e3, tied head): the sampler, its log-probs and the
    gradient from its states stay finite."""
    from fdrl.sampling import Sampler

    config = llama.LlamaConfig.tiny()
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    params["embed"].value = params["embed"][...] * 1e3
    sampler = Sampler(graphdef, config, max_new_tokens=6, eos_id=3, pad_id=0, buckets=(8,), keep_states=True)
    prompt, valid = sampler.pad([[5, 6, 7], [4]])
    out = sampler(params, prompt, valid, jax.random.PRNGKey(0))
    assert bool(jnp.all(jnp.isfinite(out.logp))) and bool(jnp.all(jnp.isfinite(out.states)))
    grads = jax.grad(lambda p: jnp.sum(logprobs.continuation_logp_from_states(
        graphdef, p, prompt, valid, out.tokens, out.mask, out.states, out.logp)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
    accumulated = logprobs.accumulate_continuation_grads(graphdef, params, prompt, valid, out.tokens, out.mask,
                                                      jnp.ones(out.mask.shape), grads)  # gradient accumulation
    for path, g in jax.tree_util.tree_leaves_with_path(accumulated):
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)

    def clipped_ratio_loss(tok, values):  # PPO's surrogate, advantage −1, old log-probs 1 nat lower
        ratio = jnp.exp(jnp.where(out.mask, tok - (out.logp - 1.0), 0.0))  # e: unclipped where A < 0
        return -jnp.sum(jnp.minimum(-ratio, -jnp.clip(ratio, 0.8, 1.2)) * out.mask), values

    accumulated, (loss, _) = logprobs.accumulate_loss_grads(graphdef, params, prompt, valid, out.tokens, out.mask,
                                                         clipped_ratio_loss, grads)
    assert bool(jnp.isfinite(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(accumulated):
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
