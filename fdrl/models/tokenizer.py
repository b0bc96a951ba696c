"""The SmolLM2 tokenizer, rebuilt from the vocabulary and merges stored in the GGUF
file with the `tokenizers` library: byte-level BPE, digits split one by one before
the GPT-2 regex, the 17 control tokens as special tokens, no BOS added; and the
ChatML chat template.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CONTROL_TOKEN_TYPE = 3
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class Tokenizer:
    """encode/decode plus the ids a sampler needs (bos, eos, pad)."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                 bos_id: int, eos_id: int, pad_id: int):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import AddedToken, decoders, models, pre_tokenizers

        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
        self._tok = HFTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        self._tok.decoder = decoders.ByteLevel()
        special = [tokens[i] for i, t in enumerate(token_types) if t == CONTROL_TOKEN_TYPE]
        self._tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
        self.special_tokens = tuple(special)
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @classmethod
    def from_gguf(cls, file) -> "Tokenizer":
        """From a GGUF file's metadata (fdrl.models.gguf_file.GGUFFile)."""
        meta = file.metadata
        return cls(
            tokens=meta["tokenizer.ggml.tokens"],
            merges=meta["tokenizer.ggml.merges"],
            token_types=meta["tokenizer.ggml.token_type"],
            bos_id=int(meta["tokenizer.ggml.bos_token_id"]),
            eos_id=int(meta["tokenizer.ggml.eos_token_id"]),
            pad_id=int(meta["tokenizer.ggml.padding_token_id"]),
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids, mask=None, skip_special_tokens: bool = True) -> list[str]:
        """[B, N] ids (and an optional [B, N] mask of real tokens) → B strings."""
        ids = np.asarray(ids)
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
        return [self.decode(row[m], skip_special_tokens) for row, m in zip(ids, mask)]


def chat_prompt(user: str, system: str | None = DEFAULT_SYSTEM) -> str:
    """ChatML, as SmolLM2-Instruct's template renders one user turn plus the
    generation prompt (the default system turn is added like the template does)."""
    parts = []
    if system is not None:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    parts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    return "".join(parts)
