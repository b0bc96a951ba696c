"""Models: a Flax Llama decoder, the SmolLM2 GGUF loader, and its tokenizer."""

from fdrl.models.llama import KVCache, Llama, LlamaConfig, ModelOutput, continuation_logp, forward

__all__ = ["KVCache", "Llama", "LlamaConfig", "ModelOutput", "continuation_logp", "forward"]
