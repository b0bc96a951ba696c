import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdrl.models import llama


@pytest.fixture(scope="module")
def tiny():
    config = llama.LlamaConfig.tiny(value_head=True)
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    return config, graphdef, params


def test_shapes_axes_and_param_count(tiny):
    config, graphdef, params = tiny
    tokens = jnp.ones((2, 5), jnp.int32)
    out = llama.forward(graphdef, params, tokens, jnp.ones((2, 5), bool))
    assert out.logits.shape == (2, 5, config.vocab_size) and out.logits.dtype == jnp.float32
    assert out.values.shape == (2, 5)
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
    specs = nnx.get_partition_spec(params)
    assert tuple(specs["wq"].value) == ("layers", "embed", "heads")
    assert tuple(specs["embed"].value) == ("vocab", "embed")


def test_jit_equals_eager(tiny):
    _, graphdef, params = tiny
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 97)
    valid = jnp.ones((2, 7), bool)
    eager = llama.forward(graphdef, params, tokens, valid).logits
    jitted = jax.jit(lambda p, t, v: llama.forward(graphdef, p, t, v).logits)(params, tokens, valid)
    np.testing.assert_allclose(eager, jitted, atol=1e-5)


def test_left_padding_changes_nothing(tiny):
    _, graphdef, params = tiny
    seq = jax.random.randint(jax.random.PRNGKey(2), (1, 6), 0, 97)
    plain = llama.forward(graphdef, params, seq, jnp.ones((1, 6), bool)).logits
    padded_tokens = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), seq], axis=1)
    padded_valid = jnp.concatenate([jnp.zeros((1, 3), bool), jnp.ones((1, 6), bool)], axis=1)
    padded = llama.forward(graphdef, params, padded_tokens, padded_valid).logits[:, 3:]
    np.testing.assert_allclose(plain, padded, atol=1e-5)


def test_cached_decoding_equals_full_forward(tiny):
    config, graphdef, params = tiny
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, 97)
    valid = jnp.ones((2, 8), bool)
    full = llama.forward(graphdef, params, tokens, valid).logits
    cache = llama.KVCache.init(config, 2, 8)
    out = llama.forward(graphdef, params, tokens[:, :5], valid[:, :5], cache, 0)
    steps = [out.logits]
    cache = out.cache
    for t in range(5, 8):
        out = llama.forward(graphdef, params, tokens[:, t:t + 1], valid[:, t:t + 1], cache, t)
        cache = out.cache
        steps.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_decode_step_with_transposed_weights_runs_column_major_and_equals_the_plain_layer(dtype, blocks):
    """A decode step's layer with kept, transposed weights keeps its activations [features, B]
    (llama._layer_columns: each product w_t @ h); it equals the plain layer on [B, 1, D]."""
    config = llama.LlamaConfig.tiny(param_dtype=dtype, compute_dtype=dtype)
    model = llama.Llama(config, rngs=nnx.Rngs(1))
    group = config.num_heads // config.num_kv_heads

    def attend(q, k, v):  # stands in for attention: uses q, k and v, gives [B, 1, H, hd]
        return q * 0.5 + jnp.repeat(k * v, group, axis=2), None

    x = jax.random.normal(jax.random.PRNGKey(2), (3, 1, config.hidden_dim)).astype(dtype)
    cos, sin = llama._rotary(jnp.asarray([[2], [0], [5]]), config.head_dim, config.rope_theta, 8)
    plain = model.unstack_layers()[0]
    kept = model.unstack_layers(blocks, transposed=True)[0]
    assert isinstance(kept[6], llama.TransposedWeight)
    expected, _ = llama._layer(config, x, plain, attend, cos=cos, sin=sin)
    columns = jax.jit(lambda x, p: llama._layer(config, x, p, attend, cos=cos, sin=sin)[0])
    got = columns(x, kept)
    assert got.shape == x.shape and got.dtype == x.dtype
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol)
    if jax.default_backend() == "cpu":  # XLA's CPU products (a GPU's become gemm calls)
        # Compiled, the products take the weight [N, K] as their left operand: no [B, N] dot.
        text = columns.lower(x, kept).compile().as_text()
        dots = re.findall(r"= \S+\[(\d+),(\d+)\]\S* dot\(", text)
        assert dots and all(int(cols) == 3 for _, cols in dots), dots


@pytest.mark.parametrize("batch", [3, llama._COLUMN_LOGITS_MAX_ROWS + 1])
def test_decode_step_logits_from_the_embedding_as_left_operand(tiny, batch):
    """A decode step of few rows makes its tied logits as embed [V, D] @ hidden [D, B] on CPU
    (llama._decode_logits); they equal the full forward's."""
    config, graphdef, params = tiny
    tokens = jax.random.randint(jax.random.PRNGKey(4), (batch, 4), 0, config.vocab_size)
    valid = jnp.ones((batch, 4), bool)
    full = llama.forward(graphdef, params, tokens, valid).logits[:, -1:]
    step = jax.jit(lambda p, t, v, c: llama.forward(graphdef, p, t, v, c, 3).logits)
    cache = llama.forward(graphdef, params, tokens[:, :3], valid[:, :3], llama.KVCache.init(config, batch, 4), 0).cache
    got = step(params, tokens[:, 3:], valid[:, 3:], cache)
    assert got.shape == (batch, 1, config.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, full, atol=1e-4)
    if jax.default_backend() == "cpu":  # the layout of XLA's CPU products (a GPU's gemm rewrites differ)
        text = step.lower(params, tokens[:, 3:], valid[:, 3:], cache).compile().as_text()
        shapes = re.findall(r"= f32\[(\d+),(\d+)\]\S* dot\(", text)
        columns = (str(config.vocab_size), str(batch)) in shapes
        assert columns == (batch <= llama._COLUMN_LOGITS_MAX_ROWS), shapes


def test_rotary_tables_equal_the_formula_and_leave_no_trigonometry_in_the_graph(tiny):
    config, graphdef, params = tiny
    positions = jnp.asarray([[-1, 0, 1, 7], [3, 5, 100, 6]])  # -1 and 100: padding, clamped into the table
    cos, sin = llama._rotary(positions, 8, 10_000.0, num_positions=8)
    inv_freq = 1.0 / 10_000.0 ** (np.arange(0, 8, 2) / 8)
    angles = np.clip(np.asarray(positions), 0, 7)[..., None] * inv_freq
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)
    # XLA on CPU would evaluate a cos/sin in every layer's fusions of a decode step: the
    # compiled cached step reads tables instead.
    cache = llama.KVCache.init(config, 2, 8)
    step = jax.jit(lambda p, t, v, c: llama.forward(graphdef, p, t, v, c, 3).logits)
    text = step.lower(params, jnp.ones((2, 1), jnp.int32), jnp.ones((2, 1), bool), cache).compile().as_text()
    assert not re.search(r"\b(cosine|sine)\(", text)


def test_bfloat16_cached_decoding_keeps_bfloat16_values_and_equals_full_forward():
    """With bfloat16 compute the cache holds bfloat16 values, stored as float32 on CPU
    (llama.cache_dtype: XLA on CPU would convert a bfloat16 cache whole at every slot
    written), and cached decoding still matches the full forward pass to bfloat16 round-off."""
    config = llama.LlamaConfig.tiny(param_dtype="bfloat16", compute_dtype="bfloat16")
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, 97)
    valid = jnp.ones((2, 8), bool)
    full = llama.forward(graphdef, params, tokens, valid).logits
    step = jax.jit(functools.partial(llama.forward, graphdef), static_argnums=4)
    cache = llama.KVCache.init(config, 2, 8)
    expected_dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    assert {b.dtype for b in cache.k + cache.v} == {jnp.dtype(expected_dtype)}  # 16-bit: converted whole per slot
    out = step(params, tokens[:, :5], valid[:, :5], cache, 0)
    logits = [out.logits]
    for t in range(5, 8):
        out = step(params, tokens[:, t:t + 1], valid[:, t:t + 1], out.cache, t)
        logits.append(out.logits)
    for buffer in out.cache.k + out.cache.v:
        values = np.asarray(buffer, np.float32)
        assert np.any(values != 0)
        np.testing.assert_array_equal(values, np.asarray(jnp.asarray(values).astype(jnp.bfloat16), np.float32))
    cached = np.asarray(jnp.concatenate(logits, axis=1))
    assert np.all(np.isfinite(cached))
    np.testing.assert_allclose(cached, np.asarray(full), rtol=0, atol=2e-2 * np.abs(np.asarray(full)).max())


def test_continuation_logp_matches_log_softmax(tiny):
    _, graphdef, params = tiny
    prompt = jnp.array([[0, 5, 6], [7, 8, 9]])
    prompt_valid = jnp.array([[False, True, True], [True, True, True]])
    completion = jnp.array([[10, 11], [12, 13]])
    mask = jnp.array([[True, False], [True, True]])
    logp, values = llama.continuation_logp(graphdef, params, prompt, prompt_valid, completion, mask)
    full = llama.forward(graphdef, params, jnp.concatenate([prompt, completion], 1),
                         jnp.concatenate([prompt_valid, mask], 1))
    ref = jax.nn.log_softmax(full.logits, -1)
    np.testing.assert_allclose(logp[1, 1], ref[1, 3, 13], atol=1e-5)
    assert float(logp[0, 1]) == 0.0 and values.shape == (2, 2)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        llama.LlamaConfig.tiny(num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="unknown remat='some'"):
        llama.LlamaConfig.tiny(remat="some")
    with pytest.raises(ValueError, match="logits_chunk must be >= 0"):
        llama.LlamaConfig.tiny(logits_chunk=-1)
    with pytest.raises(ValueError, match="targets .* must be"):
        llama.chunked_token_logp(jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)), jnp.zeros((2, 4), jnp.int32), 2)
    with pytest.raises(ValueError, match="shapes disagree"):
        config = llama.LlamaConfig.tiny()
        llama.Llama(config, rngs=nnx.Rngs(0))(jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 4), bool))


@pytest.mark.parametrize("field,value", [("remat", True), ("remat", "dots"), ("remat", "none"),
                                         ("unroll_layers", True), ("logits_chunk", 4), ("logits_chunk", 6)])
def test_layouts_of_the_computation_give_the_same_gradients(tiny, field, value):
    """remat policies, an unrolled layer scan and chunked logits (batch 3: chunks of 1 and of 2
    positions, the last one padded) change how the work is done, not its result."""
    import dataclasses

    config, graphdef, params = tiny
    other = nnx.split(nnx.eval_shape(lambda: llama.Llama(dataclasses.replace(config, **{field: value}),
                                                         rngs=nnx.Rngs(0))))[0]
    prompt = jax.random.randint(jax.random.PRNGKey(1), (3, 4), 0, config.vocab_size)
    completion = jax.random.randint(jax.random.PRNGKey(2), (3, 5), 0, config.vocab_size)
    ones = lambda x: jnp.ones(x.shape, bool)  # noqa: E731

    def loss(g, p):
        return jnp.sum(llama.continuation_logp(g, p, prompt, ones(prompt), completion, ones(completion))[0])

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
        return jnp.sum(weights * llama.chunked_token_logp(h, w, targets, chunk))

    expected = jax.grad(plain, argnums=(0, 1))(hidden, out_w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for chunk in (0, 6):
        got = jax.jit(jax.grad(ours, argnums=(0, 1)), static_argnums=2)(hidden, out_w, chunk)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype
            assert np.all(np.isfinite(np.asarray(a, np.float32)))
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


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
    got_out, got_vjp = jax.vjp(jax.jit(llama._swiglu), h, w_gate, w_up, w_down)
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
    out, vjp = jax.vjp(jax.jit(llama._matmul), x, w)
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
    np.testing.assert_array_equal(llama._matmul(x32, w32), x32 @ w32)


def _dots(compiled_text: str) -> list:
    """Every dot in XLA's optimised HLO as (operand dtypes, lhs contracting dims, rhs
    contracting dims). On CPU each dot sits alone in a fusion, so its operands are that
    computation's parameters."""
    found = []
    for header, body in re.findall(r"^%[\w.\-]+ \((.*?)\) -> .*? \{\n(.*?)\n\}", compiled_text, re.M | re.S):
        for line in body.split("\n"):
            if " dot(" in line:
                dims = re.search(r"lhs_contracting_dims=\{(.*?)\}, rhs_contracting_dims=\{(.*?)\}", line)
                found.append((sorted(set(re.findall(r":\s*([a-z]+\d*)\[", header))), dims.group(1), dims.group(2)))
    assert len(found) == compiled_text.count(" dot("), "a dot outside a fusion"
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU compiler is the one that upcasts")
@pytest.mark.parametrize("fn,shapes,products", [
    (llama._matmul, [(4, 63, 48), (48, 96)], 2),  # the backward's two
    (llama._swiglu, [(4, 63, 48), (48, 96), (48, 96), (96, 48)], 8)])  # gate and up (residuals), 6 backward
def test_bfloat16_backward_products_stay_bfloat16_on_cpu(fn, shapes, products):
    """The backward passes' products of bfloat16 layers take bfloat16 operands on CPU
    (llama._transposed): XLA on CPU makes a product with a transposed bfloat16 operand a
    float32 product of converted copies, at a fraction of the bfloat16 rate on AMX."""
    args = [jax.random.normal(jax.random.PRNGKey(i), s).astype(jnp.bfloat16) for i, s in enumerate(shapes)]
    cotangent = jnp.ones(jax.eval_shape(fn, *args).shape, jnp.bfloat16)
    backward = jax.jit(lambda *a: jax.vjp(fn, *a)[1](cotangent))
    dots = _dots(backward.lower(*args).compile().as_text())
    # bfloat16 operands, and a plain [M, K] × [K, N] (XLA on CPU upcasts or slows down others)
    assert dots == [(["bf16"], "1", "0")] * products, dots


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU compiler is the one that upcasts")
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_bfloat16_output_projection_products_stay_bfloat16_on_cpu(scale):
    """The policy update's output projection (llama._token_logp_grads: logits, and both
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
    grads = jax.jit(lambda h, e, t, g: llama._token_logp_grads(h, e.T, t, g, 0))
    dots = _dots(grads.lower(hidden, embed, targets, g).compile().as_text())
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
        return jnp.sum(weights * llama.continuation_logp(graphdef, p, prompt, valid, out.tokens, out.mask)[0])

    def from_states(p):
        return jnp.sum(weights * llama.continuation_logp_from_states(graphdef, p, prompt, valid, out.tokens,
                                                                     out.mask, out.states, out.logp))

    value, grads = jax.value_and_grad(forced)(params)
    value_s, grads_s = jax.jit(jax.value_and_grad(from_states))(params)
    np.testing.assert_allclose(value_s, value, atol=1e-4)
    for (path, g), g_s in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_s)):
        assert float(jnp.abs(g).max()) > 0, path
        np.testing.assert_allclose(g_s, g, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match=r"states \(4, 3"):
        llama.continuation_logp_from_states(graphdef, params, prompt, valid, out.tokens, out.mask,
                                            out.states[:, :, 1:], out.logp)
    with pytest.raises(ValueError, match="token_logp"):
        llama.continuation_logp_from_states(graphdef, params, prompt, valid, out.tokens, out.mask, out.states,
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
    grads = jax.grad(lambda p: jnp.sum(cotangent * llama.continuation_logp(
        graphdef, p, prompt, valid, completion, mask)[0]))(params)
    into = jax.tree.map(lambda g: jax.random.normal(jax.random.PRNGKey(3), g.shape), grads)
    accumulate = jax.jit(functools.partial(llama.accumulate_continuation_grads, graphdef))
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
        llama.accumulate_continuation_grads(graphdef, params, prompt, valid, completion, mask, cotangent[:, 1:], into)


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
        lambda p: loss_fn(*llama.continuation_logp(graphdef, p, prompt, valid, completion, mask)), has_aux=True)(params)
    into = jax.tree.map(lambda g: jax.random.normal(jax.random.PRNGKey(3), g.shape), grads)
    total, (acc_loss, acc_aux) = jax.jit(lambda p, i: llama.accumulate_loss_grads(
        graphdef, p, prompt, valid, completion, mask, loss_fn, i))(params, into)
    assert float(acc_loss) == pytest.approx(float(loss), rel=1e-5)
    assert float(acc_aux) == pytest.approx(float(aux), rel=1e-5) and float(aux) > 1.2  # some ratios are clipped
    for (path, g), start, t in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(into),
                                   jax.tree.leaves(total)):
        assert float(jnp.abs(g).max()) > 0, path
        np.testing.assert_allclose(t - start, g, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    if not value_head:
        with pytest.raises(ValueError, match="value_cotangent given, but the model has no value head"):
            llama._grads_from_states(graphdef, params, prompt, valid, completion, mask,
                                     llama._teacher_forced_states(graphdef, params, prompt, valid, completion, mask),
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
    grads = jax.grad(lambda p: jnp.sum(llama.continuation_logp_from_states(
        graphdef, p, prompt, valid, out.tokens, out.mask, out.states, out.logp)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
    accumulated = llama.accumulate_continuation_grads(graphdef, params, prompt, valid, out.tokens, out.mask,
                                                      jnp.ones(out.mask.shape), grads)  # gradient accumulation
    for path, g in jax.tree_util.tree_leaves_with_path(accumulated):
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)

    def clipped_ratio_loss(tok, values):  # PPO's surrogate, advantage −1, old log-probs 1 nat lower
        ratio = jnp.exp(jnp.where(out.mask, tok - (out.logp - 1.0), 0.0))  # e: unclipped where A < 0
        return -jnp.sum(jnp.minimum(-ratio, -jnp.clip(ratio, 0.8, 1.2)) * out.mask), values

    accumulated, (loss, _) = llama.accumulate_loss_grads(graphdef, params, prompt, valid, out.tokens, out.mask,
                                                         clipped_ratio_loss, grads)
    assert bool(jnp.isfinite(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(accumulated):
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
