import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdrl.models import kernels, llama, logprobs


def test_shapes_axes_and_param_count(tiny_llama):
    config, graphdef, params = tiny_llama
    tokens = jnp.ones((2, 5), jnp.int32)
    out = llama.forward(graphdef, params, tokens, jnp.ones((2, 5), bool))
    assert out.logits.shape == (2, 5, config.vocab_size) and out.logits.dtype == jnp.float32
    assert out.values.shape == (2, 5)
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
    specs = nnx.get_partition_spec(params)
    assert tuple(specs["wq"].value) == ("layers", "embed", "heads")
    assert tuple(specs["embed"].value) == ("vocab", "embed")


def test_jit_equals_eager(tiny_llama):
    _, graphdef, params = tiny_llama
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 97)
    valid = jnp.ones((2, 7), bool)
    eager = llama.forward(graphdef, params, tokens, valid).logits
    jitted = jax.jit(lambda p, t, v: llama.forward(graphdef, p, t, v).logits)(params, tokens, valid)
    np.testing.assert_allclose(eager, jitted, atol=1e-5)


def test_left_padding_changes_nothing(tiny_llama):
    _, graphdef, params = tiny_llama
    seq = jax.random.randint(jax.random.PRNGKey(2), (1, 6), 0, 97)
    plain = llama.forward(graphdef, params, seq, jnp.ones((1, 6), bool)).logits
    padded_tokens = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), seq], axis=1)
    padded_valid = jnp.concatenate([jnp.zeros((1, 3), bool), jnp.ones((1, 6), bool)], axis=1)
    padded = llama.forward(graphdef, params, padded_tokens, padded_valid).logits[:, 3:]
    np.testing.assert_allclose(plain, padded, atol=1e-5)


def test_cached_decoding_equals_full_forward(tiny_llama):
    config, graphdef, params = tiny_llama
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
    assert isinstance(kept[6], kernels.TransposedWeight)
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


@pytest.mark.parametrize("batch", [3, kernels.COLUMN_LOGITS_MAX_ROWS + 1])
def test_decode_step_logits_from_the_embedding_as_left_operand(tiny_llama, batch):
    """A decode step of few rows makes its tied logits as embed [V, D] @ hidden [D, B] on CPU
    (kernels.decode_logits); they equal the full forward's."""
    config, graphdef, params = tiny_llama
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
        assert columns == (batch <= kernels.COLUMN_LOGITS_MAX_ROWS), shapes


def test_rotary_tables_equal_the_formula_and_leave_no_trigonometry_in_the_graph(tiny_llama):
    config, graphdef, params = tiny_llama
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


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        llama.LlamaConfig.tiny(num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="unknown remat='some'"):
        llama.LlamaConfig.tiny(remat="some")
    with pytest.raises(ValueError, match="logits_chunk must be >= 0"):
        llama.LlamaConfig.tiny(logits_chunk=-1)
    with pytest.raises(ValueError, match="targets .* must be"):
        logprobs.chunked_token_logp(jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)), jnp.zeros((2, 4), jnp.int32), 2)
    with pytest.raises(ValueError, match="shapes disagree"):
        config = llama.LlamaConfig.tiny()
        llama.Llama(config, rngs=nnx.Rngs(0))(jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 4), bool))
