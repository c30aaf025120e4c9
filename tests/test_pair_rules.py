"""label.py's pair rules on hand-made scores: best vs worst (the default), best vs a random other, best vs
second best, all pairs above the margin, and the length-penalised ranking; what each drops is counted.

The main prompt, four finished responses:

    text   a     b     c     d
    score  0.2   0.9   0.5   -0.1
    tokens 5     12    3     8
"""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import label  # noqa: E402
from brevity.config import UserError, run_main  # noqa: E402
from brevity.files import read_jsonl  # noqa: E402


def response(text: str, score: float, tokens: int, finish: str = "eos") -> dict:
    return {"text": text, "score": score, "num_tokens": tokens, "finish_reason": finish}


ROW = {"prompt": "p", "responses": [response("a", 0.2, 5), response("b", 0.9, 12), response("c", 0.5, 3),
                                    response("d", -0.1, 8)]}


def pairs_of(row: dict, index: int = 0, **settings) -> tuple[list[tuple[str, str]], dict[str, int]]:
    pairs, drops = label.make_pairs(row, index, label.Settings(**settings))
    return [(p["chosen"], p["rejected"]) for p in pairs], drops


def test_best_worst_is_the_default_and_pairs_the_highest_with_the_lowest():
    assert pairs_of(ROW) == ([("b", "d")], {"tie": 0, "below_margin": 0, "fewer_than_two": 0})


def test_best_worst_takes_the_first_of_equal_scores():
    row = {"prompt": "p", "responses": [response("x", 0.5, 1), response("y", 0.5, 1), response("z", 0.1, 1),
                                        response("w", 0.1, 1)]}
    assert pairs_of(row)[0] == [("x", "z")]


def test_best_second_pairs_the_two_highest():
    assert pairs_of(ROW, pair_rule="best_second")[0] == [("b", "c")]


def test_best_second_drops_a_tie_for_first_place():
    """Scores 1, 1, 0: best and second best tie."""
    row = {"prompt": "p", "responses": [response("x", 1.0, 1), response("y", 1.0, 1), response("z", 0.0, 1)]}
    assert pairs_of(row, pair_rule="best_second") == ([], {"tie": 1, "below_margin": 0, "fewer_than_two": 0})


def test_best_random_pairs_the_best_with_a_seeded_draw_from_the_others():
    """The draw is the same on a rerun, changes with the seed and the prompt's row, never picks the best,
    and over seeds 0..49 reaches each of the three others."""
    draw = {seed: pairs_of(ROW, 3, pair_rule="best_random", seed=seed)[0] for seed in range(50)}
    assert all(pairs == [("b", pairs[0][1])] for pairs in draw.values())
    assert {pairs[0][1] for pairs in draw.values()} == {"a", "c", "d"}
    assert pairs_of(ROW, 3, pair_rule="best_random", seed=7) == pairs_of(ROW, 3, pair_rule="best_random", seed=7)
    rows_differ = {pairs_of(ROW, i, pair_rule="best_random", seed=7)[0][0][1] for i in range(30)}
    assert len(rows_differ) > 1


def test_all_pairs_keeps_every_pair_whose_gap_reaches_the_margin():
    """min_margin 0.35; gaps b-c 0.4, b-a 0.7, b-d 1.0, c-a 0.3, c-d 0.6, a-d 0.3: four kept, two below."""
    pairs, drops = pairs_of(ROW, pair_rule="all_pairs", min_margin=0.35)
    assert pairs == [("b", "c"), ("b", "a"), ("b", "d"), ("c", "d")]
    assert drops == {"tie": 0, "below_margin": 2, "fewer_than_two": 0}


def test_all_pairs_counts_each_tied_pair():
    """Scores 1, 1, 0: (x, y) ties; (x, z) and (y, z) are kept."""
    row = {"prompt": "p", "responses": [response("x", 1.0, 1), response("y", 1.0, 1), response("z", 0.0, 1)]}
    assert pairs_of(row, pair_rule="all_pairs") == ([("x", "z"), ("y", "z")],
                                                    {"tie": 1, "below_margin": 0, "fewer_than_two": 0})


def test_length_penalised_ranks_by_score_minus_lambda_times_tokens():
    """lambda 0.05: a 0.2 - 0.25 = -0.05, b 0.9 - 0.6 = 0.3, c 0.5 - 0.15 = 0.35, d -0.1 - 0.4 = -0.5: the short c
    beats the long b. The pair keeps the raw scores: reward_gap 0.5 - -0.1 = 0.6."""
    pairs, _ = label.make_pairs(ROW, 0, label.Settings(pair_rule="length_penalised", length_penalty=0.05))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("c", "d")]
    assert pairs[0]["reward_gap"] == pytest.approx(0.6) and pairs[0]["length_gap"] == -5


def test_length_penalised_ties_and_margins_are_on_the_penalised_score():
    """lambda 0.1: scores 1.0 and 0.5 at 10 and 5 tokens both rank 0: a tie; lambda 0.05: 0.5 and 0.25, a gap of
    0.25, below a margin of 0.3."""
    row = {"prompt": "p", "responses": [response("x", 1.0, 10), response("y", 0.5, 5)]}
    assert pairs_of(row, pair_rule="length_penalised", length_penalty=0.1)[1]["tie"] == 1
    assert pairs_of(row, pair_rule="length_penalised", length_penalty=0.05, min_margin=0.3)[1]["below_margin"] == 1


@pytest.mark.parametrize("rule", ["best_worst", "best_random", "best_second", "all_pairs", "length_penalised"])
def test_every_rule_drops_a_prompt_with_fewer_than_two_usable_responses(rule):
    row = {"prompt": "p", "responses": [response("x", 1.0, 3), response("y", 0.0, 9, "length"), response("", 2.0, 1)]}
    assert pairs_of(row, pair_rule=rule) == ([], {"tie": 0, "below_margin": 0, "fewer_than_two": 1})


def test_label_stats_names_the_rule_and_counts_what_it_dropped():
    tie = {"prompt": "q", "responses": [response("x", 1.0, 1), response("y", 1.0, 1), response("z", 0.0, 1)]}
    s = label.Settings(pair_rule="all_pairs", min_margin=0.35)
    pairs, drops = [], {"tie": 0, "below_margin": 0, "fewer_than_two": 0}
    for i, row in enumerate([ROW, tie]):
        kept, dropped = label.make_pairs(row, i, s)
        pairs += kept
        drops = {k: drops[k] + dropped[k] for k in drops}
    stats = label.label_stats([ROW, tie], pairs, drops, s)
    assert (stats["pair_rule"], stats["pairs_written"], stats["prompts_with_pairs"]) == ("all_pairs", 6, 2)
    assert (stats["dropped_ties"], stats["dropped_below_margin"]) == (1, 2)


@pytest.mark.parametrize("settings", [{"length_penalty": 0.1}, {"pair_rule": "length_penalised",
                                                                  "length_penalty": math.nan}])
def test_a_length_penalty_outside_length_penalised_or_not_finite_is_refused(settings):
    with pytest.raises(UserError, match="--length_penalty"):
        label.check_pair_settings(label.Settings(**settings))


def test_label_writes_the_rules_pairs(tmp_path):
    """End to end with --pair_rule all_pairs and a reward of the response's word count: 3 responses of 1, 2 and
    3 words give 3 pairs; the rule is in label_stats.json."""
    (tmp_path / "words.py").write_text("def count(prompts, responses):\n"
                                       "    return [float(len(r.split())) for r in responses]\n")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "p", "responses": [
        {"text": t, "num_tokens": len(t.split()) + 1, "finish_reason": "eos"} for t in ("a", "a b", "a b c")]}) + "\n")
    run_main(label.main, (label.Settings,), ["--samples", str(samples), "--reward_fn", f"{tmp_path / 'words.py'}:count",
                                            "--pair_rule", "all_pairs"])
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a b c", "a b"), ("a b c", "a"), ("a b", "a")]
    assert json.loads((tmp_path / "label_stats.json").read_text())["pair_rule"] == "all_pairs"
