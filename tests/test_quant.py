import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdrl.models import gguf_loader, llama, logprobs, quant

KINDS = {"Q4_1": gguf.GGMLQuantizationType.Q4_1, "Q8_0": gguf.GGMLQuantizationType.Q8_0}


def quantize_rows(w: np.ndarray, kind: str) -> quant.Quantized:
    """[rows, cols] float32 → Quantized, by the gguf package's own quantiser (as a GGUF file holds it)."""
    data = gguf.quants.quantize(np.asarray(w, np.float32), KINDS[kind])
    return jax.tree.map(jnp.asarray, quant.from_gguf_blocks(data, kind, *w.shape))


def quantize_ours(w: np.ndarray, kind: str) -> quant.Quantized:
    """A weight in our [..., in, out] layout, stored as GGUF does: blocks along `in`, per layer."""
    w = np.asarray(w, np.float32)
    if w.ndim == 2:
        return dataclasses.replace(quantize_rows(w.T, kind), transposed=True)
    return jax.tree.map(lambda *a: jnp.stack(a), *[quantize_ours(layer, kind) for layer in w])


def gguf_dequantized(w: np.ndarray, kind: str) -> np.ndarray:
    data = gguf.quants.quantize(np.asarray(w, np.float32), KINDS[kind])
    return np.asarray(gguf.dequantize(data, KINDS[kind]), np.float32).reshape(w.shape)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_dequantize_is_exactly_gguf_dequantize(kind):
    w = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32) * 0.1
    q = quantize_rows(w, kind)
    assert q.kind == kind and q.shape == (6, 96) and q.dtype == jnp.float32
    assert q.nbytes < w.nbytes / 3
    expected = gguf_dequantized(w, kind)
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.Quantized.dequantize)(q)), expected)
    # Transposed: the same values in our [in, out] layout.
    qt = dataclasses.replace(q, transposed=True)
    assert qt.shape == (96, 6)
    np.testing.assert_array_equal(np.asarray(qt.astype(jnp.float32)), expected.T)
    np.testing.assert_array_equal(np.asarray(qt.T), expected)


def test_indexing_selects_layers_and_embedding_rows():
    rng = np.random.default_rng(1)
    stacked = rng.standard_normal((3, 64, 8)).astype(np.float32)  # [L, in, out]
    q = quantize_ours(stacked, "Q4_1")
    assert q.shape == (3, 64, 8) and q[...] is q
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(q[i].dequantize()), gguf_dequantized(stacked[i].T, "Q4_1").T)
    embed = rng.standard_normal((10, 32)).astype(np.float32)
    qe = quantize_rows(embed, "Q8_0")
    tokens = jnp.array([[3, 0], [9, 3]])
    np.testing.assert_array_equal(np.asarray(qe[tokens].dequantize()), gguf_dequantized(embed, "Q8_0")[np.asarray(tokens)])
    with pytest.raises(IndexError, match="can index its first 1 axes only"):
        q[0, 1]  # the transposed weight's `in` axis holds the blocks
    with pytest.raises(IndexError, match="first 1 axes"):
        qe[1, 2]


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="unsupported GGUF quantisation 'Q5_K'"):
        quant.from_gguf_blocks(np.zeros((2, 20), np.uint8), "Q5_K", 2, 32)
    with pytest.raises(ValueError, match="40 values, not a multiple of 32"):
        quant.from_gguf_blocks(np.zeros((2, 20), np.uint8), "Q4_1", 2, 40)


def quantize_state(params):
    """Every matrix of an nnx parameter State Q4_1 (the embedding Q8_0), as SmolLM2's file has them."""
    pure = nnx.to_pure_dict(params)
    for name, w in pure.items():
        if name == "embed":
            pure[name] = quantize_rows(np.asarray(w), "Q8_0")
        elif name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            pure[name] = quantize_ours(np.asarray(w), "Q4_1")
    quantized = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(quantized, pure)
    return quantized


def quantized_tiny():
    """A tiny Llama, quantised, and a float copy with the dequantised (the same) values."""
    config = llama.LlamaConfig.tiny()
    graphdef, params = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)))
    qparams = quantize_state(params)
    return config, graphdef, qparams, quant.dequantize_tree(qparams)


def test_model_with_quantized_weights_matches_its_float_copy():
    config, graphdef, qparams, float_params = quantized_tiny()
    assert sum(x.nbytes for x in jax.tree.leaves(qparams)) < sum(x.nbytes for x in jax.tree.leaves(float_params)) / 2
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(float_params))
    rng = np.random.default_rng(2)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (2, 5)))
    valid = jnp.asarray([[True] * 5, [False, False, True, True, True]])
    completion = jnp.asarray(rng.integers(0, config.vocab_size, (2, 4)))
    mask = jnp.ones((2, 4), bool)
    logp_q, _ = jax.jit(lambda p: logprobs.continuation_logp(graphdef, p, prompt, valid, completion, mask))(qparams)
    logp_f, _ = logprobs.continuation_logp(graphdef, float_params, prompt, valid, completion, mask)
    np.testing.assert_allclose(logp_q, logp_f, atol=1e-5)
    # The sampler's path: per-layer weights dequantised once (unstack_layers), cached decoding.
    from fdrl.sampling import Sampler
    sampler = Sampler(graphdef, config, max_new_tokens=4, eos_id=2, pad_id=0)
    out_q = sampler(qparams, prompt, valid, jax.random.PRNGKey(0))
    out_f = sampler(float_params, prompt, valid, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out_q.tokens, out_f.tokens)
    np.testing.assert_allclose(out_q.logp, out_f.logp, atol=1e-5)
    # Kept decode layers of the quantised model: dequantised (and transposed) once.
    layers = sampler.decode_layers(qparams, 2)
    assert all(not isinstance(x, quant.Quantized) for x in jax.tree.leaves(layers, is_leaf=lambda x: isinstance(
        x, quant.Quantized)))
    out_kept = sampler(qparams, prompt, valid, jax.random.PRNGKey(0), layers=layers)
    np.testing.assert_array_equal(out_kept.tokens, out_f.tokens)
    np.testing.assert_allclose(out_kept.logp, out_f.logp, atol=1e-5)


def test_trainer_with_a_quantized_reference(tmp_path):
    """The policy starts as the exact dequantised reference, and a step runs and stays finite."""
    from configs import smollm2_word
    from fdrl import train

    config = smollm2_word.get_config("smoke")
    config.update(dict(model="tiny", out_dir=str(tmp_path), progress_bar=False))
    task = train.build_task(config)
    qref = quantize_state(task.ref_params)
    trainer = train.Trainer(config, task=task._replace(ref_params=qref))
    assert isinstance(nnx.to_pure_dict(trainer.task.ref_params)["wq"], quant.Quantized)
    state = trainer.init_state()
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(quant.dequantize_tree(qref))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, scalars = trainer.step(state)
    assert all(np.isfinite(float(v)) for k, v in scalars.items() if k != "log_Z")


@pytest.mark.slow
def test_smollm2_quantized_reference_holds_the_same_weights():
    model_q, tok = gguf_loader.load_gguf(quantized=True)
    model_f, _ = gguf_loader.load_gguf()
    (graphdef, qparams), (_, fparams) = nnx.split(model_q), nnx.split(model_f)
    assert sum(x.nbytes for x in jax.tree.leaves(qparams)) < 0.11e9  # vs 0.54 GB in float32
    for a, b in zip(jax.tree.leaves(quant.dequantize_tree(qparams)), jax.tree.leaves(fparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = jnp.asarray([tok.encode("The capital of France is")])
    valid = jnp.ones_like(ids, bool)
    logits_q = jax.jit(lambda p: llama.forward(graphdef, p, ids, valid).logits)(qparams)
    logits_f = jax.jit(lambda p: llama.forward(graphdef, p, ids, valid).logits)(fparams)
    np.testing.assert_allclose(logits_q, logits_f, atol=2e-4)
