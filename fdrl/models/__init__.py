"""Models: a Flax Llama decoder, its completions' log-probs, the SmolLM2 GGUF loader, and its tokenizer."""

from fdrl.models.llama import KVCache, Llama, LlamaConfig, ModelOutput, forward
from fdrl.models.logprobs import continuation_logp

__all__ = ["KVCache", "Llama", "LlamaConfig", "ModelOutput", "continuation_logp", "forward"]
