"""Scorers (texts → float32 [B]) and their composition into EBM targets."""

from fdrl.scorers.compose import DistributionalTerm, PointwiseTerm, RewardTerm, TextTarget, make_scorer
from fdrl.scorers.sentiment import SentimentScorer
from fdrl.scorers.text import LengthScorer, RegexScorer, WordScorer

__all__ = ["DistributionalTerm", "PointwiseTerm", "RewardTerm", "TextTarget", "make_scorer", "SentimentScorer",
           "LengthScorer", "RegexScorer", "WordScorer"]
