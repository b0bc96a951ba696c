r"""Sampler throughput: fdrl's jitted KV-cache sampler vs HF transformers' `generate`,
same GGUF file (SmolLM2-135M-Instruct), same machine, same run.

  pip install -e ".[bench]"                  # torch (CPU) + transformers, the reference
  python experiments/bench_sampler.py        # batch 1, 16, 64 × 32 new tokens

Both sample at temperature 1 with EOS disabled (exactly batch × new_tokens tokens
each), in --dtype (float32 by default), after a warm-up call; times are medians of
--repeats. On CPU torch uses as many threads as there are cores; where JAX runs on a
GPU the reference runs on the GPU too (CUDA), with TF32 float32 matmuls as JAX's GPU
default. Writes experiments/results/bench_sampler.md.

fdrl is timed two ways: with the per-layer weights made once and kept
(`Sampler.decode_layers`, how repeated sampling with fixed weights runs, like the
reference's model loaded once), and with them made in every call (how the trainer
samples, its weights changing every step).
"""

import os
import statistics
import time

from absl import flags

import common
import jax
from flax import nnx

from fdrl.models import gguf_loader
from fdrl.models.tokenizer import chat_prompt
from fdrl.sampling import Sampler

_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "New tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
_OUT = flags.DEFINE_string("out", "experiments/results", "Output folder.")
_BLOCKS = flags.DEFINE_integer("column_blocks", 0, "Sampler(column_blocks=); 0 = automatic.")
_TARGET = flags.DEFINE_float("target", 1.5, "The speed-up over HF that the report checks at batch 16 and 64.")
_SKIP_HF = flags.DEFINE_bool("skip_reference", False, "Time fdrl only (no HF reference, no report).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute of both samplers.")
PROMPT = "Tell me about your day."


def bench_ours(batch: int, new_tokens: int, repeats: int) -> dict:
    """tokens/s with the decode layers kept ("kept") and made in every call ("per_call")."""
    model, tok = gguf_loader.load_gguf(param_dtype=_DTYPE.value, compute_dtype=_DTYPE.value)
    graphdef, params = nnx.split(model)
    sampler = Sampler(graphdef, model.config, max_new_tokens=new_tokens, eos_id=-1, pad_id=tok.pad_id,
                      column_blocks=_BLOCKS.value or None)
    prompt, valid = sampler.pad([tok.encode(chat_prompt(PROMPT, system=None))] * batch)
    result = {}
    for mode in ("kept", "per_call"):
        layers = sampler.decode_layers(params, batch) if mode == "kept" else None
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = sampler(params, prompt, valid, jax.random.PRNGKey(i), layers=layers)
            out.tokens.block_until_ready()
            times.append(time.perf_counter() - start)
        assert int(out.mask.sum()) == batch * new_tokens
        result[mode] = batch * new_tokens / statistics.median(times[1:])
        del layers, out
    return result


def reference_device() -> str:
    """"cuda" where JAX runs on an NVIDIA GPU and torch sees one, else "cpu"."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def bench_hf(batch: int, new_tokens: int, repeats: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = reference_device()
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # as JAX's default precision on GPU
    path = gguf_loader.find_smollm2_gguf()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=getattr(torch, _DTYPE.value))
    model = model.to(device).eval()
    ids = tok(chat_prompt(PROMPT, system=None), return_tensors="pt").input_ids.repeat(batch, 1).to(device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            torch.manual_seed(i)
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=tok.eos_token_id)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return batch * new_tokens / statistics.median(times[1:])


def main(argv):
    del argv
    rows, raw = [], {}
    for batch in map(int, _BATCHES.value):
        ours = bench_ours(batch, _NEW.value, _REPEATS.value)
        if _SKIP_HF.value:
            print(f"batch {batch}: fdrl {ours['kept']:.1f} tokens/s with decode layers kept, "
                  f"{ours['per_call']:.1f} made per call", flush=True)
            continue
        try:
            ref = bench_hf(batch, _NEW.value, _REPEATS.value)
        except ImportError as e:
            raise SystemExit(f"the reference needs torch and transformers: pip install -e '.[bench]' ({e})")
        raw[batch] = dict(fdrl_tokens_per_s=ours["kept"], fdrl_per_call_tokens_per_s=ours["per_call"],
                          hf_tokens_per_s=ref)
        rows.append([str(batch), f"{ours['kept']:.1f}", f"{ours['per_call']:.1f}", f"{ref:.1f}",
                     f"{ours['kept'] / ref:.2f}×", f"{ours['per_call'] / ref:.2f}×"])
        print(rows[-1], flush=True)
    if _SKIP_HF.value:
        return
    import torch
    import transformers
    target_batches = [b for b in (16, 64) if b in raw]
    verdicts = []
    for mode, key in (("kept", "fdrl_tokens_per_s"), ("per call", "fdrl_per_call_tokens_per_s")):
        ratios = {f"batch {b}": raw[b][key] / raw[b]["hf_tokens_per_s"] for b in target_batches}
        verdicts.append(f"Target ≥ {_TARGET.value}× HF's tokens/s at batch {' and '.join(map(str, target_batches))}, "
                        f"layers {mode}: {common.speedup_verdict(ratios, _TARGET.value)}")
    if reference_device() == "cpu":
        where = f"{os.cpu_count()} CPU cores"
    else:
        tf32 = ", TF32 float32 matmuls as JAX's default" if _DTYPE.value == "float32" else ""
        where = f"{jax.devices()[0].device_kind} (JAX) and {torch.cuda.get_device_name()} (torch{tf32}), " \
                f"{os.cpu_count()} CPU cores"
    command = "python experiments/bench_sampler.py" + ("" if _DTYPE.value == "float32" else f" --dtype={_DTYPE.value}")
    report = "\n".join([
        f"# Sampler throughput: SmolLM2-135M-Instruct (GGUF, dequantised to {_DTYPE.value}), {_NEW.value} new tokens",
        "", f"Command: `{command}`", "",
        f"Same machine, same run: {where}; jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Temperature 1, EOS disabled, median of {_REPEATS.value} after a warm-up; "
        f"column_blocks {_BLOCKS.value or 'automatic (sampling.auto_column_blocks)'}.{common.heap_note()}",
        "",
        "fdrl with its decode layers kept (`Sampler.decode_layers`, made once like the reference's loaded "
        "model: repeated sampling with fixed weights), and made in every call (the trainer's sampling, whose "
        "weights change every step).",
        "", common.markdown_table(["batch", "fdrl tokens/s (layers kept)", "fdrl tokens/s (layers per call)",
                                   "HF generate tokens/s", "ratio (kept)", "ratio (per call)"], rows),
        *(["", *(f"- {v}" for v in verdicts)] if target_batches else [])])
    name = "bench_sampler" + ("" if _DTYPE.value == "float32" else f"_{_DTYPE.value}")
    common.write_results(_OUT.value, name, report, raw)


if __name__ == "__main__":
    common.run(main)
