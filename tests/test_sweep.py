"""examples/sweep.py on a tiny grid: every point trained and evaluated through the stages, the tables,
the share of points below SFT, and the figure (CPU, seconds)."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, write_jsonl

sys.path.insert(0, str(ROOT / "examples"))
import sweep  # noqa: E402


@pytest.fixture()
def setup(tmp_path, tiny_model_dir, tiny_prefs_jsonl, monkeypatch):
    """A gold scorer that pays for short answers, 6 evaluation prompts, the tiny model as 'SFT'."""
    (tmp_path / "toy_gold.py").write_text(
        "def score(prompts, responses):\n    return [-len(r.split()) for r in responses]\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"list {w} fruits", "chosen": "apple pear"}
                                                    for w in ("two", "three", "four", "a", "the", "red")])
    return ["--sft_model", str(tiny_model_dir), "--data", str(tiny_prefs_jsonl), "--prompts", str(prompts),
            "--gold_fn", "toy_gold:score", "--max_new_tokens", "8", "--out_dir", str(tmp_path / "sweep")]


def run(argv):
    from brevity.config import run_main

    return run_main(sweep.main, (sweep.Settings,), argv=argv)


def test_grid_trains_and_evaluates_every_point_and_draws_the_figure(setup, tmp_path):
    results = run([*setup, "--mode", "grid", "--losses", "dpo,simpo", "--grid_lrs", "1e-3", "--grid_epochs", "1"])
    assert [(r["loss"], r["lr"], r["knob"], r["epochs"]) for r in results] == [
        ("dpo", 1e-3, ("beta", 0.1), 1), ("dpo", 1e-3, ("beta", 0.5), 1),
        ("simpo", 1e-3, ("gamma", 1.0), 1), ("simpo", 1e-3, ("gamma", 3.0), 1)]
    out = tmp_path / "sweep"
    for r in results:
        assert json.loads((out / r["name"] / "eval" / "eval.json").read_text())["gold_score"] == r["gold_score"]
        assert json.loads((out / r["name"] / "model" / "settings.json").read_text())["loss"] == r["loss"]
    sft = json.loads((out / "sft_eval" / "eval.json").read_text())["gold_score"]
    below = sum(r["gold_score"] < sft for r in results if r["loss"] == "dpo") / 2
    assert f"| dpo | 2 | {below:.0%} |" in (out / "grid.md").read_text()
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_gives_each_loss_over_the_seeds_with_a_standard_error(setup, tmp_path):
    results = run([*setup, "--mode", "table", "--losses", "lndpo", "--seeds", "0,1", "--epochs", "1"])
    assert [r["seed"] for r in results] == [0, 1] and results[0]["name"] != results[1]["name"]
    table = (tmp_path / "sweep" / "table.md").read_text()
    mean, err = sweep.mean_and_stderr([r["gold_score"] for r in results])
    assert f"| lndpo | 2 | {mean:.3f} ± {err:.3f} |" in table


def test_the_grid_summary_gives_the_median_of_an_even_number_of_points():
    point = dict(lr=1e-4, knob=("beta", 0.1), epochs=1, gold_score_stderr=0.0, kl_vs_sft=0.0)
    results = [{**point, "loss": "dpo", "gold_score": g, "length": n} for g, n in ((0.1, 7), (0.4, 9), (0.2, 8),
                                                                                   (-0.3, 10))]
    text = sweep.grid_markdown(results, {"gold_score": 0.15, "length": 7.0})
    assert "| dpo | 4 | 50% | 0.150 | -0.300 | 8.50 |" in text
