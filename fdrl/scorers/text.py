"""Scorers over decoded texts: batched, host-side, returning float32 [B] arrays."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np


class WordScorer:
    """1.0 if the text contains any of `words` as a whole word, else 0.0."""

    def __init__(self, words: Sequence[str], case_sensitive: bool = False):
        if isinstance(words, str):
            words = (words,)
        if not words or not all(w.strip() for w in words):
            raise ValueError(f"WordScorer needs non-empty words, got {words!r}")
        self.words = tuple(words)
        flags = 0 if case_sensitive else re.IGNORECASE
        self._pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in self.words) + r")\b", flags)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([1.0 if self._pattern.search(t) else 0.0 for t in texts], np.float32)


class RegexScorer:
    """1.0 if `pattern` matches anywhere in the text."""

    def __init__(self, pattern: str, flags: int = 0):
        try:
            self._pattern = re.compile(pattern, flags)
        except re.error as e:
            raise ValueError(f"bad regex pattern={pattern!r}: {e}") from None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([1.0 if self._pattern.search(t) else 0.0 for t in texts], np.float32)


class LengthScorer:
    """Length of the text in words or characters."""

    def __init__(self, unit: str = "words"):
        if unit not in ("words", "chars"):
            raise ValueError(f"LengthScorer unit must be 'words' or 'chars', got {unit!r}")
        self.unit = unit

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        count = (lambda t: len(t.split())) if self.unit == "words" else len
        return np.array([count(t) for t in texts], np.float32)
