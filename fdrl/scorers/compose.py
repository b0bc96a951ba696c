"""Targets over texts: log P(x) = log a(x) + Σ_terms log-potential(x).

    target = TextTarget([PointwiseTerm(WordScorer("amazing"), log_floor=-inf)])
    target = TextTarget([RewardTerm(SentimentScorer(), beta=0.1)])
    target = TextTarget([DistributionalTerm([WordScorer(FEMALE)], mu_bar=[0.5])]).fit(base_texts)

A product of terms is their sum in log space. Scorers run on the host over
decoded texts; the potentials are float32 [B] arrays ready for the jitted step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from fdrl import targets
from fdrl.scorers.sentiment import SentimentScorer
from fdrl.scorers.text import LengthScorer, RegexScorer, WordScorer

Scorer = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass
class RewardTerm:
    """RLHF: r(x)/β."""

    scorer: Scorer
    beta: float

    def __post_init__(self):
        targets.rlhf_log_potential(jnp.zeros(1), self.beta)  # validates β

    def log_potential(self, texts):
        return np.asarray(targets.rlhf_log_potential(self.scorer(texts), self.beta))

    def score(self, texts):
        return self.scorer(texts)


@dataclasses.dataclass
class PointwiseTerm:
    """GDC pointwise constraint: log b(x), b = 0 floored at log ε = log_floor."""

    scorer: Scorer
    log_floor: float = -math.inf

    def log_potential(self, texts):
        return np.asarray(targets.pointwise_log_potential(self.scorer(texts), self.log_floor))

    def score(self, texts):
        return self.scorer(texts)


@dataclasses.dataclass
class DistributionalTerm:
    """GDC distributional constraint: λ·φ(x), λ fitted so E_p[φ] = μ̄."""

    scorers: Sequence[Scorer]
    mu_bar: Sequence[float]
    lam: np.ndarray | None = None

    def features(self, texts):
        return np.stack([s(texts) for s in self.scorers], axis=1).astype(np.float32)

    def fit(self, base_texts: Sequence[str]) -> "targets.LambdaFit":
        """Fits λ on samples from the base model (self-normalised importance sampling)."""
        fit = targets.fit_lambda(self.features(base_texts), jnp.asarray(self.mu_bar, jnp.float32))
        self.lam = np.asarray(fit.lam)
        return fit

    def log_potential(self, texts):
        if self.lam is None:
            raise ValueError("DistributionalTerm has no λ yet: call TextTarget.fit(base_texts) first")
        return np.asarray(targets.distributional_log_potential(self.features(texts), self.lam))

    def score(self, texts):
        return self.features(texts)[:, 0]


class TextTarget:
    """A product of terms; `alignment` reports the first term's score."""

    def __init__(self, terms: Sequence):
        if not terms:
            raise ValueError("a TextTarget needs at least one term")
        self.terms = list(terms)

    def fit(self, base_texts: Sequence[str]) -> "TextTarget":
        for term in self.terms:
            if isinstance(term, DistributionalTerm):
                term.fit(base_texts)
        return self

    def log_potential(self, texts: Sequence[str]) -> np.ndarray:
        return np.sum([t.log_potential(texts) for t in self.terms], axis=0).astype(np.float32)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.terms[0].score(texts), np.float32)

    @property
    def needs_fit(self) -> bool:
        return any(isinstance(t, DistributionalTerm) and t.lam is None for t in self.terms)


def make_scorer(kind: str, **kwargs) -> Scorer:
    """A scorer by config name: word, regex, sentiment, length."""
    if kind == "word":
        return WordScorer(tuple(kwargs["words"]))
    if kind == "regex":
        return RegexScorer(kwargs["pattern"])
    if kind == "sentiment":
        return SentimentScorer()
    if kind == "length":
        return LengthScorer(kwargs.get("unit", "words"))
    raise ValueError(f"unknown scorer kind={kind!r}; choose word, regex, sentiment or length")
