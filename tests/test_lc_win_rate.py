"""evaluate.length_controlled_win_rate: the unpenalised maximum-likelihood fit wherever it exists, checked
against fits that share no code with it (a closed form, a numpy IRLS); the penalised fit only where the
outcomes are separated by length."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluate  # noqa: E402


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def irls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Logistic regression of soft labels y on [1, x] by iteratively reweighted least squares."""
    features = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-features @ w))
        weights = p * (1 - p)
        working = features @ w + (y - p) / weights
        w = np.linalg.solve(features.T @ (weights[:, None] * features), features.T @ (weights * working))
    return w


def test_lc_win_rate_matches_the_closed_form_with_two_symmetric_length_gaps():
    """dlen is +1 or -1 in equal numbers, so x = tanh(dlen / sd) is +c or -c and the model is saturated:
    sigmoid(a + b c) is the win rate of the longer responses (0.8), sigmoid(a - b c) that of the shorter
    (0.4, a tie counting half), hence a = (logit 0.8 + logit 0.4) / 2 and the LC win rate is sigmoid(a)."""
    longer = [1.0] * 8 + [0.0] * 2
    shorter = [1.0] * 3 + [0.5] * 2 + [0.0] * 5
    fit = evaluate.length_controlled_win_rate(longer + shorter, [1.0] * 10 + [-1.0] * 10)
    a = (logit(0.8) + logit(0.4)) / 2
    assert not fit["penalised"]
    assert fit["intercept"] == pytest.approx(a, abs=1e-9)
    assert fit["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-a)), abs=1e-9)


def test_lc_win_rate_matches_an_independent_irls_fit():
    rng = random.Random(0)
    diffs = [rng.choice([-3, -1, 0, 0, 1, 2, 4, 6]) for _ in range(300)]
    wins = [rng.choice([0.0, 0.5, 1.0, 1.0]) if d > 0 else rng.choice([0.0, 0.0, 0.5, 1.0]) for d in diffs]
    x = np.tanh(np.array(diffs, dtype=float) / np.std(diffs, ddof=1))
    a, b = irls(x, np.array(wins))
    fit = evaluate.length_controlled_win_rate(wins, diffs)
    assert not fit["penalised"]
    assert (fit["intercept"], fit["slope"]) == pytest.approx((a, b), abs=1e-9)


def test_lc_win_rate_falls_back_to_the_penalised_fit_when_length_separates_the_outcomes():
    """Every win is longer than every loss: the likelihood rises without bound as the slope grows."""
    fit = evaluate.length_controlled_win_rate([0.0, 0.0, 0.5, 1.0, 1.0], [-2, -1, 0, 0, 3])
    assert fit["penalised"] and math.isfinite(fit["slope"]) and fit["slope"] > 0
    assert 0.0 < fit["lc_win_rate"] < 1.0


def record(gold: float, sft_gold: float, length: int, sft_length: int) -> dict:
    return {"gold": gold, "sft_gold": sft_gold, "chosen_gold": 0.0, "logp": -1.0, "sft_logp": -1.0,
            "num_tokens": length, "sft_num_tokens": sft_length, "chosen_num_tokens": 3,
            "finish_reason": "eos", "sft_finish_reason": "eos"}


def test_the_equal_length_win_rate_counts_only_the_prompts_where_both_answers_have_the_same_length():
    records = [record(1.0, 0.0, 5, 5), record(0.5, 0.5, 5, 5), record(0.0, 1.0, 5, 5),  # won, tied, lost
               record(0.0, 1.0, 9, 5), record(0.0, 1.0, 9, 5)]  # lost, and longer
    out = evaluate.metrics(records)
    assert out["prompts_equal_length"] == 3
    assert out["win_rate_vs_sft_equal_length"] == pytest.approx(0.5)
    assert out["win_rate_vs_sft_equal_length_stderr"] == pytest.approx(0.5 / math.sqrt(3))
    assert out["win_rate_vs_sft"] == pytest.approx(0.3)
    assert evaluate.metrics(records[3:])["win_rate_vs_sft_equal_length"] is None
