import math

import numpy as np
import pytest

from fdrl import scorers


def test_word_regex_length():
    assert scorers.WordScorer(("she", "her"))(["She left.", "he left", "shelter", "for HER"]).tolist() == [1, 0, 0, 1]
    assert scorers.RegexScorer(r"\d{3}")(["call 555", "no"]).tolist() == [1, 0]
    assert scorers.LengthScorer()(["a b c", ""]).tolist() == [3, 0]
    assert scorers.LengthScorer("chars")(["abc"]).tolist() == [3]
    with pytest.raises(ValueError, match="bad regex"):
        scorers.RegexScorer("(")
    with pytest.raises(ValueError, match="non-empty words"):
        scorers.WordScorer(())


def test_vader_known_sentences():
    s = scorers.SentimentScorer()(["I love this, it is wonderful!", "This is terrible.", "The table."])
    np.testing.assert_allclose(s, [0.8478, -0.4767, 0.0], atol=1e-4)


def test_text_targets_compose():
    word = scorers.WordScorer("good")
    target = scorers.TextTarget([scorers.PointwiseTerm(word, log_floor=math.log(0.01)),
                                 scorers.RewardTerm(scorers.LengthScorer(), beta=2.0)])
    np.testing.assert_allclose(target.log_potential(["a good day", "bad"]), [0 + 3 / 2, math.log(0.01) + 1 / 2], rtol=1e-6)
    with pytest.raises(ValueError, match="beta must be"):
        scorers.RewardTerm(word, beta=0.0)


def test_distributional_fit_reaches_its_moment():
    texts = ["she said"] * 20 + ["he said"] * 80
    target = scorers.TextTarget([scorers.DistributionalTerm([scorers.WordScorer("she")], mu_bar=(0.5,))])
    with pytest.raises(ValueError, match="call TextTarget.fit"):
        target.log_potential(texts)
    target.fit(texts)
    w = np.exp(target.log_potential(texts))
    assert np.sum(w * target.score(texts)) / np.sum(w) == pytest.approx(0.5, abs=1e-4)
