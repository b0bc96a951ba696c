import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdrl import sampling
from fdrl.models import kernels, llama, logprobs


@pytest.fixture(scope="module")
def model():
    config = llama.LlamaConfig.tiny()
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    return config, graphdef, params


def make_sampler(model, **kw):
    config, graphdef, _ = model
    kw = dict(dict(max_new_tokens=10, eos_id=3, pad_id=0), **kw)
    return sampling.Sampler(graphdef, config, buckets=(8, 16), **kw)


def test_pad_prompts_left_pads_to_bucket():
    tokens, valid = sampling.pad_prompts([[5, 6], [7, 8, 9]], pad_id=0, buckets=(4, 8))
    np.testing.assert_array_equal(tokens, [[0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(valid, [[0, 0, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="longer than the largest bucket 8"):
        sampling.pad_prompts([list(range(9))], 0, (4, 8))


# Decode layers made in the call (plain or transposed), or kept (transposed).
@pytest.mark.parametrize("transposed,kept", [(False, False), (True, False), (None, True)],
                         ids=["per_call_plain", "per_call_transposed", "kept"])
def test_sampler_logp_equals_teacher_forced_logp(model, transposed, kept):
    _, graphdef, params = model
    sampler = make_sampler(model, transposed_layers=transposed)
    prompt, valid = sampler.pad([[5, 6, 7], [8, 9, 10, 11, 12]])
    layers = sampler.decode_layers(params, 2) if kept else None
    out = sampler(params, prompt, valid, jax.random.PRNGKey(0), layers=layers)
    forced, _ = logprobs.continuation_logp(graphdef, params, jnp.asarray(prompt), jnp.asarray(valid), out.tokens, out.mask)
    np.testing.assert_allclose(out.logp, forced, atol=1e-4)


def _eos_likely(params):
    """The tiny model's params with EOS (3) made likely, so rows stop at different steps."""
    params = jax.tree.map(lambda x: x, params)
    embed = params["embed"][...]
    params["embed"].value = embed.at[3].set(embed[3] + 0.5 * jnp.sign(embed.mean(0)))
    return params


def test_eos_stops_each_sequence_and_masks_after(model):
    params = _eos_likely(model[2])
    sampler = make_sampler(model, max_new_tokens=30)
    prompt, valid = sampler.pad([[5, 6]] * 8)
    out = sampler(params, prompt, valid, jax.random.PRNGKey(1))
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    stopped = 0
    for row, m in zip(tokens, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # a prefix of real tokens
        assert (row[:n - 1] != 3).all()  # no EOS before the last real token
        if n < 30:
            assert row[n - 1] == 3 and (row[n:] == 0).all()
            stopped += 1
    assert stopped > 0
    assert float(jnp.abs(out.logp * ~out.mask).max()) == 0.0


def test_no_recompile_for_new_prompt_in_same_bucket_or_new_temperature(model):
    _, _, params = model
    sampler = make_sampler(model)
    for prompts, temp, top_p in [([[5, 6, 7]], 1.0, 1.0), ([[9, 1]], 0.7, 0.9), ([[4, 4, 4, 4, 4]], 1.3, 0.5)]:
        prompt, valid = sampler.pad(prompts)
        sampler(params, prompt, valid, jax.random.PRNGKey(0), temperature=temp, top_p=top_p).tokens.block_until_ready()
    assert sampler.trace_count == 1
    prompt, valid = sampler.pad([list(range(1, 12))])  # the 16 bucket: one more compile
    sampler(params, prompt, valid, jax.random.PRNGKey(0))
    assert sampler.trace_count == 2


def test_greedy_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    key = jax.random.PRNGKey(0)
    tok, lp = sampling.sample_token(logits, key, jnp.float32(0.0), 0, jnp.float32(1.0))
    assert int(tok[0]) == 0 and float(lp[0]) == 0.0
    keys = jax.random.split(key, 2000)
    draw = jax.vmap(lambda k: sampling.sample_token(logits, k, jnp.float32(1.0), 2, jnp.float32(1.0)))(keys)
    assert set(np.asarray(draw[0]).ravel().tolist()) == {0, 1}
    np.testing.assert_allclose(np.exp(draw[1][draw[0] == 0][0]), 0.5 / 0.8, rtol=1e-5)
    draw = jax.vmap(lambda k: sampling.sample_token(logits, k, jnp.float32(1.0), 0, jnp.float32(0.7)))(keys)
    assert set(np.asarray(draw[0]).ravel().tolist()) == {0, 1}  # 0.5 < 0.7 ≤ 0.8: two tokens kept


def test_inverse_cdf_over_many_blocks_matches_softmax():
    """The two-level search (blocks of CDF_BLOCK) draws from softmax exactly: a vocabulary of
    three blocks and a partial one, a whole block excluded, mass on both sides of each edge."""
    vocab = 3 * sampling.CDF_BLOCK + 100
    rng = np.random.default_rng(0)
    logits = np.full(vocab, -np.inf, np.float32)
    heavy = [0, 255, 256 * 2, 256 * 2 + 255, 256 * 3, vocab - 1, 17, 600]  # block edges and the ragged end
    logits[heavy] = rng.normal(size=len(heavy)).astype(np.float32) + 3.0
    light = rng.choice(np.arange(256 * 2, vocab), 50, replace=False)  # block 1 stays excluded
    logits[light] = rng.normal(size=50).astype(np.float32) - 2.0
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    rows = jnp.tile(jnp.asarray(logits)[None], (40_000, 1))  # one draw per row
    tok, lp = jax.jit(sampling.sample_token, static_argnums=3)(rows, jax.random.PRNGKey(1), jnp.float32(1.0), 0,
                                                               jnp.float32(1.0))
    tok, lp = np.asarray(tok).ravel(), np.asarray(lp).ravel()
    assert np.all(np.isfinite(logits[tok])), "drew an excluded token"
    np.testing.assert_allclose(lp, np.log(probs[tok]), atol=1e-5)
    freq = np.bincount(tok, minlength=vocab) / tok.size
    assert 0.5 * np.abs(freq - probs).sum() < 0.02


@pytest.mark.parametrize("temperature,top_p,top_k", [(2e-6, 1.0, 0), (1e-5, 1e-9, 0), (1e6, 1.0, 0),
                                                     (float("inf"), 1.0, 0), (1.0, 1e-9, 5), (0.5, 0.3, 1)])
def test_draws_stay_finite_at_the_extremes(temperature, top_p, top_k):
    """Temperatures just above greedy or unbounded, a nucleus of one token, top-1: every draw
    is a real token with a finite log-prob ≤ 0."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 1000)) * 60, jnp.float32)
    tok, lp = jax.jit(sampling.sample_token, static_argnums=3)(logits, jax.random.PRNGKey(0), jnp.float32(temperature),
                                                               top_k, jnp.float32(top_p))
    assert np.all(np.isfinite(lp)) and np.all(np.asarray(lp) <= 0)
    assert np.all((0 <= np.asarray(tok)) & (np.asarray(tok) < 1000))
    if top_p < 1e-6 or top_k == 1:  # only the mode survives
        np.testing.assert_array_equal(tok, np.argmax(logits, -1))


def test_bad_arguments(model):
    _, _, params = model
    sampler = make_sampler(model)
    prompt, valid = sampler.pad([[5]])
    with pytest.raises(ValueError, match="top_p must be in"):
        sampler(params, prompt, valid, jax.random.PRNGKey(0), top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampler(params, prompt, valid, jax.random.PRNGKey(0), temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        make_sampler(model, max_new_tokens=0)
    with pytest.raises(ValueError, match="column_blocks must be >= 1 or None .automatic., got 0"):
        make_sampler(model, column_blocks=0)
    with pytest.raises(ValueError, match=r"column_blocks must be in \[1, 32\].*got 33"):
        make_sampler(model, column_blocks=33)(params, prompt, valid, jax.random.PRNGKey(0))


@pytest.mark.parametrize("blocks", [2, 3])  # 3: uneven blocks of the tiny model's 32 columns
def test_column_blocks_draw_the_same_samples(model, blocks):
    config, _, params = model
    prompt, valid = make_sampler(model).pad([[5, 6, 7], [8, 9, 10, 11, 12], [4]])
    whole = make_sampler(model, column_blocks=1, keep_states=True)(params, prompt, valid, jax.random.PRNGKey(3))
    cut = make_sampler(model, column_blocks=blocks, keep_states=True)(params, prompt, valid, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(cut.tokens, whole.tokens)
    np.testing.assert_array_equal(cut.mask, whole.mask)
    np.testing.assert_allclose(cut.logp, whole.logp, atol=1e-5)
    np.testing.assert_allclose(cut.states, whole.states, atol=1e-5)
    layers = llama.Llama(config, rngs=nnx.Rngs(0)).unstack_layers(blocks)
    widths = [len(c) for c in np.array_split(np.arange(32), blocks)]
    for index in (4, 8):  # wo [H·hd, D] and w_down [F, D], each in column blocks
        assert [w.shape[1] for w in layers[0][index]] == widths
    # wq, wk and wv joined: [D, (H + 2·KV)·hd] in blocks of equal width, wk and wv None.
    assert [w.shape[1] for w in layers[0][1]] == [len(c) for c in np.array_split(np.arange(64), blocks)]
    assert layers[0][2] is None and layers[0][3] is None


@pytest.mark.parametrize("batch,transposed", [(1, None), (3, None), (3, False), (3, True)])
def test_kept_decode_layers_draw_the_same_samples_without_retracing(model, batch, transposed):
    config, _, params = model
    sampler = make_sampler(model, keep_states=True)
    prompt, valid = sampler.pad([[5, 6, 7], [8, 9, 10, 11, 12], [4]][:batch])
    per_call = sampler(params, prompt, valid, jax.random.PRNGKey(3))
    layers = sampler.decode_layers(params, batch, transposed)
    # On CPU in float32 the kept weights are transposed unless asked otherwise (elsewhere only if asked).
    want_transposed = transposed if transposed is not None else jax.default_backend() == "cpu"
    assert isinstance(layers[0][6], kernels.TransposedWeight) == want_transposed
    if want_transposed:
        assert layers[0][6].w_t.shape == (config.ffn_dim, config.hidden_dim)  # w_gate as [out, in]
        # w_down [F, D]: column blocks from batch 2 on, on CPU (sampling.auto_column_blocks)
        blocks = layers[0][8] if sampling.auto_column_blocks(batch) > 1 else (layers[0][8],)
        assert [b.w_t.shape for b in blocks] == [(config.hidden_dim // len(blocks), config.ffn_dim)] * len(blocks)
    traces = sampler.trace_count
    for key in (3, 4):
        kept = sampler(params, prompt, valid, jax.random.PRNGKey(key), layers=layers)
    assert sampler.trace_count == traces + 1  # one trace for calls with kept layers, then reused
    kept = sampler(params, prompt, valid, jax.random.PRNGKey(3), layers=layers)
    np.testing.assert_array_equal(kept.tokens, per_call.tokens)
    np.testing.assert_array_equal(kept.mask, per_call.mask)
    np.testing.assert_allclose(kept.logp, per_call.logp, atol=1e-5)
    np.testing.assert_allclose(kept.states, per_call.states, atol=1e-5)
    with pytest.raises(ValueError, match=f"a list of {config.num_layers} per-layer tuples, got list of 1"):
        sampler(params, prompt, valid, jax.random.PRNGKey(3), layers=layers[:1])


on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the sampler's layout choices for XLA's CPU runtime")


@on_cpu
def test_auto_column_blocks_on_cpu():
    assert [sampling.auto_column_blocks(b) for b in (1, 2, 16, 32, 33, 64)] == [1, 2, 2, 2, 1, 1]


@pytest.mark.parametrize("scale", [1e3, 1e-6])
def test_column_major_decode_stays_finite_at_extreme_weights(model, scale):
    """Weights ×1e3 (logits in the thousands) or ×1e-6 (activations near RMSNorm's eps):
    per-call transposed and kept layers (column-major decode steps, column logits) give
    finite log-probs ≤ 0 and states, and the plain layout's tokens."""
    _, _, params = model
    params = jax.tree.map(lambda a: a * scale, params)
    plain = make_sampler(model, keep_states=True, transposed_layers=False)
    prompt, valid = plain.pad([[5, 6, 7], [8, 9]])
    want = plain(params, prompt, valid, jax.random.PRNGKey(1))
    transposed = make_sampler(model, keep_states=True, transposed_layers=True)
    for layers in (None, transposed.decode_layers(params, 2)):
        got = transposed(params, prompt, valid, jax.random.PRNGKey(1), layers=layers)
        assert np.all(np.isfinite(got.logp)) and np.all(np.asarray(got.logp) <= 0)
        assert np.all(np.isfinite(got.states))
        np.testing.assert_array_equal(got.tokens, want.tokens)


@on_cpu
def test_auto_transposed_layers_on_cpu():
    assert [sampling.auto_transposed_layers(b, "float32") for b in (1, 2, 16, 32, 33, 64)] == [
        False, True, True, False, False, False]
    assert not sampling.auto_transposed_layers(16, "bfloat16")


@on_cpu
@pytest.mark.parametrize("batch", [2, 3])  # column blocks, and not (3 rows: the tiny model's blocks still apply)
def test_per_call_transposed_layers_draw_the_same_samples_with_less_memory(model, batch):
    config, _, params = model
    plain = make_sampler(model, keep_states=True, transposed_layers=False)
    auto = make_sampler(model, keep_states=True)  # transposes at 2-16 rows on CPU in float32
    prompt, valid = plain.pad([[5, 6, 7], [8, 9, 10, 11, 12], [4]][:batch])
    assert auto.jitted(batch) is auto._jitted_transposing and plain.jitted(batch) is plain._jitted
    assert auto.jitted(batch, layers=auto.decode_layers(params, batch)) is auto._jitted  # kept layers as given
    want = plain(params, prompt, valid, jax.random.PRNGKey(3))
    got = auto(params, prompt, valid, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logp, want.logp, atol=1e-5)
    np.testing.assert_allclose(got.states, want.states, atol=1e-5)
    # The transposing call runs column-major decode steps: dots with the batch as the minor
    # dimension ([N, B]), which the plain call has none of.
    hlo = {name: s.lower(params, prompt, valid, jax.random.PRNGKey(3)).compile().as_text()
           for name, s in (("plain", plain), ("auto", auto))}
    assert f"f32[{config.hidden_dim},{batch}]" in hlo["auto"] and f"f32[{config.hidden_dim},{batch}]" not in hlo["plain"]
    # Compiled in memory order: the transposed copies do not all exist beside the prefill's weights.
    temps = {name: s.lower(params, prompt, valid, jax.random.PRNGKey(3)).compile().memory_analysis().temp_size_in_bytes
             for name, s in (("plain", plain), ("auto", auto))}
    assert temps["auto"] <= temps["plain"], temps


def test_kept_states_are_teacher_forcings_layer_inputs(model):
    config, graphdef, _ = model
    params = _eos_likely(model[2])
    sampler = make_sampler(model, max_new_tokens=12, keep_states=True)
    prompt, valid = sampler.pad([[5, 6, 7], [8, 9, 10, 11, 12], [4], [6, 6]])
    out = sampler(params, prompt, valid, jax.random.PRNGKey(2))
    assert 0 < int(out.mask.sum()) < out.mask.size  # some rows stopped early
    tokens = jnp.concatenate([prompt, out.tokens], 1)[:, :-1]
    read = jnp.concatenate([valid, out.mask], 1)[:, :-1]
    assert out.states.shape == (4, config.num_layers + 1, tokens.shape[1], config.hidden_dim)
    abstract = sampling.states_shape(config, 4, prompt.shape[1], 12)  # what compile-ahead builds
    assert (abstract.shape, abstract.dtype) == (out.states.shape, out.states.dtype)
    # The same layer inputs from one cached pass over the whole teacher-forced sequence.
    forced = llama.forward(graphdef, params, tokens, read, llama.KVCache.init(config, 4, tokens.shape[1]), 0,
                           with_states=True).states
    at_read = read[:, None, :, None]  # padding and after-EOS slots hold anything
    np.testing.assert_allclose(jnp.where(at_read, out.states, 0), jnp.where(at_read, forced, 0), atol=1e-5)
    assert make_sampler(model)(params, prompt, valid, jax.random.PRNGKey(2)).states is None
