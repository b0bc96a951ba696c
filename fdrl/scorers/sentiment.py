"""VADER sentiment (the `vaderSentiment` package ships its lexicon: no download)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class SentimentScorer:
    """VADER compound score in [−1, 1] (positive = positive sentiment)."""

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise ImportError("the sentiment scorer needs vaderSentiment: pip install vaderSentiment") from e
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self._analyzer.polarity_scores(t)["compound"] for t in texts], np.float32)
