r"""Compiles the f-DPG train step of a ~1B-parameter Llama ahead of time, from abstract
shapes alone, on 8-device meshes, and reports XLA's memory analysis per device.

  python experiments/aot_compile.py            # fakes 8 CPU devices if there are fewer

Nothing is allocated: parameters, optimiser state and batch are ShapeDtypeStructs
carrying their shardings (fdrl.lm_step.lower_update). Writes experiments/results/aot_1b.md.
"""

import os

if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import time  # noqa: E402

from absl import flags  # noqa: E402

import common  # noqa: E402
import jax  # noqa: E402

from configs import smollm2_sentiment  # noqa: E402
from fdrl import sharding, train  # noqa: E402
from fdrl.models import llama  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 16, "Samples per step.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt bucket.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "New tokens per sample.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Output folder.")

MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def compile_stats(model_config, shape, dtype):
    config = smollm2_sentiment.get_config()
    config.update(dict(batch_size=_BATCH.value, max_new_tokens=_NEW.value, param_dtype=dtype, compute_dtype=dtype))
    # The teacher-forced update (its own forward pass), as in the table's earlier runs; with
    # reuse_sampler_states the update also takes the sampler's saved layer inputs.
    config.reuse_sampler_states = False
    mesh, rules = sharding.make_mesh(shape), sharding.parse_rules(config.mesh.rules)
    start = time.perf_counter()
    compiled = train.lower_update(config, model_config, mesh, rules, _PROMPT.value).compile()
    seconds = time.perf_counter() - start
    return compiled.memory_analysis(), seconds


def main(argv):
    del argv
    gib = 2.0**30
    rows = []
    for dtype in ("float32", "bfloat16"):
        model_config = llama.LlamaConfig.llama_1b(param_dtype=dtype, compute_dtype=dtype)
        for shape in MESHES if dtype == "float32" else [(1, 8, 1), (2, 2, 2)]:
            memory, seconds = compile_stats(model_config, shape, dtype)
            total = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes \
                - memory.alias_size_in_bytes
            rows.append([dtype, "×".join(map(str, shape)), f"{memory.argument_size_in_bytes / gib:.2f}",
                         f"{memory.output_size_in_bytes / gib:.2f}", f"{memory.alias_size_in_bytes / gib:.2f}",
                         f"{memory.temp_size_in_bytes / gib:.2f}", f"{total / gib:.2f}", f"{seconds:.1f}"])
            print(rows[-1], flush=True)
    n = llama.LlamaConfig.llama_1b().num_params()
    lines = ["# Ahead-of-time compile of the f-DPG step for a 1.24B Llama", "",
             "Command: `python experiments/aot_compile.py`", "",
             f"Model: Llama-3.2-1B shapes ({n / 1e9:.2f}B parameters: 16 layers, hidden 2048, 32 heads / 8 KV heads, "
             f"FFN 8192, vocabulary 128256, tied). Step: on-policy js, batch {_BATCH.value}, prompt {_PROMPT.value} + "
             f"{_NEW.value} new tokens; the reference, the policy and Adam's moments are arguments, the state is "
             f"donated. Compiled from abstract shapes on {jax.device_count()} {jax.devices()[0].device_kind} devices "
             f"(jax {jax.__version__}); nothing allocated.", "",
             "Per device, GiB, from `compiled.memory_analysis()`:", "",
             common.markdown_table(["params", "mesh (data×fsdp×tensor)", "arguments", "outputs", "aliased (donated)",
                                    "temporaries", "peak ≈ args + temps + outputs − aliased", "compile s"], rows), "",
             "Reading it: on 8×1×1 (pure data parallel) every device holds the reference, the policy and Adam "
             "whole; FSDP (1×8×1) divides them by 8, and adding tensor parallelism (1×4×2, 2×2×2) also splits "
             "the activations and the gathered weights, the temporaries. bfloat16 parameters halve the reference "
             "and the policy but add the float32 master copy (fdrl/optim.py), so the arguments stay the same size "
             "as float32, and in this CPU compile the temporaries do not shrink either: what bfloat16 buys (matmul "
             "throughput, activation memory) is an accelerator's to show. This is the CPU compiler's buffer assignment; a GPU or "
             "TPU compile of the same step assigns its own."]
    report = "\n".join(lines)
    common.write_results(_OUT.value, "aot_1b", report)


if __name__ == "__main__":
    common.run(main)
