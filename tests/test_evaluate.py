"""evaluate.py: KL of the SFT model against itself is 0; every metric in eval.json is its mean over the
per-prompt details (gold scores, win rates with a tie counted half, KL, lengths); the length-controlled
win rate is the plain one when lengths are equal and removes a pure length effect; output files in
their formats; saved SFT generations reused, and refused when made with other settings or another
model; the summary table over iterations. The models are conftest's word-level tiny Llamas."""
from __future__ import annotations

import importlib
import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORD_VOCAB, make_word_tokenizer, save_word_model, write_jsonl

from brevity import config, files, tokens
import evaluate


@pytest.fixture(scope="module")
def models(tmp_path_factory, policy_dir) -> dict[str, Path]:
    """sft (conftest's word-level policy), a copy of it under another path (same weights), and another
    policy (other weights)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(policy_dir, root / "sft_copy")
    return {"sft": policy_dir, "sft_copy": root / "sft_copy",
            "policy": save_word_model(root / "policy", make_word_tokenizer(), seed=1)}


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(WORD_VOCAB) for _ in range(rng.randint(1, 6))),
             "chosen": " ".join(rng.choice(WORD_VOCAB) for _ in range(rng.randint(1, 5)))} for _ in range(12)]
    rows[3]["prompt"] = [{"role": "user", "content": "list two fruits"}]
    rows[4]["dataset"] = "helpful"
    return write_jsonl(tmp_path_factory.mktemp("eval") / "eval.jsonl", rows)


@pytest.fixture(scope="module")
def gold_module(tmp_path_factory) -> str:
    """A gold scorer on sys.path that pays for the words 'apple' and 'red' and a little for brevity (and, as
    toy_gold:words, a labelling reward that pays for words)."""
    folder = tmp_path_factory.mktemp("gold")
    (folder / "toy_gold.py").write_text(
        "def score(prompts, responses):\n"
        "    return [sum(w in ('apple', 'red') for w in r.split()) - 0.1 * len(r.split()) for r in responses]\n"
        "def words(prompts, responses):\n"
        "    return [len(r.split()) for r in responses]\n",
        encoding="utf-8")
    sys.path.insert(0, str(folder))
    yield "toy_gold:score"
    sys.path.remove(str(folder))


def run_eval(models, eval_file, gold_module, out: Path, model="policy", **overrides) -> dict:
    overrides = {"max_new_tokens": 10, "batch_size": 5, **overrides}
    s = evaluate.Settings(model=str(models[model]), sft_model=str(models["sft"]), prompts=str(eval_file),
                          gold_fn=gold_module, output_dir=str(out), **overrides)
    return evaluate.main(s)


def test_kl_of_the_sft_model_against_itself_is_zero(models, eval_file, gold_module, tmp_path):
    """The copy is loaded, sampled and scored separately: same weights and seeds give the same
    responses (every comparison a tie) and the same log-probs."""
    result = run_eval(models, eval_file, gold_module, tmp_path / "eval", model="sft_copy")
    assert result["kl_vs_sft"] == 0.0 and result["kl_per_token_vs_sft"] == 0.0
    assert result["win_rate_vs_sft"] == 0.5 and result["lc_win_rate_vs_sft"] == pytest.approx(0.5)
    assert result["length"] == result["length_sft"] and result["gold_score"] == result["gold_score_sft"]


@pytest.fixture(scope="module")
def evaluated(models, eval_file, gold_module, tmp_path_factory) -> dict:
    """One evaluation of the policy against the SFT model, its SFT generations saved for reuse:
    {"result", "out", "sft_file", "details", "generations"}."""
    root = tmp_path_factory.mktemp("evaluated")
    result = run_eval(models, eval_file, gold_module, root / "eval", sft_generations=str(root / "sft.jsonl"))
    return {"result": result, "out": root / "eval", "sft_file": root / "sft.jsonl",
            "details": files.read_jsonl(root / "eval" / "details.jsonl"),
            "generations": json.loads((root / "eval" / "generations.json").read_text())}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def test_eval_json_holds_the_returned_metrics(evaluated):
    assert json.loads((evaluated["out"] / "eval.json").read_text()) == evaluated["result"]
    assert evaluated["result"]["prompts"] == 12 and len(evaluated["details"]) == 12


def test_gold_scores_are_the_gold_functions_means_over_the_prompts(evaluated, gold_module):
    """details.jsonl holds the gold scorer's value of each response; eval.json their means."""
    score = importlib.import_module(gold_module.split(":")[0]).score
    result, details = evaluated["result"], evaluated["details"]
    for side, output in (("gold", "output"), ("sft_gold", "sft_output"), ("chosen_gold", "chosen")):
        assert [d[side] for d in details] == pytest.approx(score(None, [d[output] for d in details])), side
    assert result["gold_score"] == pytest.approx(mean(d["gold"] for d in details))
    assert result["gold_score_sft"] == pytest.approx(mean(d["sft_gold"] for d in details))
    assert result["gold_score_chosen"] == pytest.approx(mean(d["chosen_gold"] for d in details))


def test_win_rates_are_the_shares_of_prompts_won_with_a_tie_counted_half(evaluated):
    result, details = evaluated["result"], evaluated["details"]
    assert any(d["gold"] == d["sft_gold"] for d in details)  # a tie occurs, so its half is checked

    def wins(other):
        return [1.0 if d["gold"] > d[other] else 0.5 if d["gold"] == d[other] else 0.0 for d in details]
    assert result["win_rate_vs_sft"] == pytest.approx(mean(wins("sft_gold")))
    assert result["win_rate_vs_chosen"] == pytest.approx(mean(wins("chosen_gold")))
    assert 0.0 <= result["lc_win_rate_vs_sft"] <= 1.0


def test_kl_is_the_mean_log_ratio_of_the_policy_responses(evaluated):
    result, details = evaluated["result"], evaluated["details"]
    assert result["kl_vs_sft"] != 0.0  # another policy
    assert result["kl_vs_sft"] == pytest.approx(mean(d["logp"] - d["sft_logp"] for d in details))
    assert result["kl_per_token_vs_sft"] == pytest.approx(mean((d["logp"] - d["sft_logp"]) / d["num_tokens"]
                                                               for d in details))


def test_lengths_are_mean_response_tokens_and_share_without_eos_the_cut_ones(evaluated):
    """A response cut at max_new_tokens (10) has 10 tokens, one that ended has at most 10 with its EOS;
    the chosen response's count is its words plus EOS (one token per word here)."""
    result, details = evaluated["result"], evaluated["details"]
    for d in details:
        for prefix in ("", "sft_"):
            n, finish = d[f"{prefix}num_tokens"], d[f"{prefix}finish_reason"]
            assert n == 10 if finish == "length" else (finish == "eos" and 1 <= n <= 10), d
        assert d["chosen_num_tokens"] == len(d["chosen"].split()) + 1
    assert result["length"] == pytest.approx(mean(d["num_tokens"] for d in details))
    assert result["length_sft"] == pytest.approx(mean(d["sft_num_tokens"] for d in details))
    assert result["length_chosen"] == pytest.approx(mean(d["chosen_num_tokens"] for d in details))
    assert result["share_without_eos"] == mean(d["finish_reason"] == "length" for d in details)


def test_generations_json_is_alpacaeval_model_outputs_in_prompt_order(evaluated, eval_file, models):
    rows, generations = files.read_jsonl(eval_file), evaluated["generations"]
    assert [set(g) for g in generations] == [{"instruction", "output", "generator", "dataset"}] * 12
    assert [g["instruction"] for g in generations] == [tokens.prompt_user_text(r["prompt"]) for r in rows]
    assert generations[3]["instruction"] == "list two fruits" and generations[4]["dataset"] == "helpful"
    assert generations[0]["dataset"] == "eval" and generations[0]["generator"] == str(models["policy"])
    assert [g["output"] for g in generations] == [d["output"] for d in evaluated["details"]]


def test_sft_generations_file_holds_the_sft_responses_and_their_settings(evaluated, models):
    sft = files.read_jsonl(evaluated["sft_file"])
    assert [r["output"] for r in sft] == [d["sft_output"] for d in evaluated["details"]]
    assert sft[0]["seed"] == 0 and sft[0]["max_new_tokens"] == 10 and sft[0]["generator"] == str(models["sft"])


def test_saved_sft_generations_are_reused(evaluated, models, eval_file, gold_module, tmp_path, monkeypatch):
    calls = []
    real = evaluate.generate_responses
    monkeypatch.setattr(evaluate, "generate_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_eval(models, eval_file, gold_module, tmp_path / "b", sft_generations=str(evaluated["sft_file"]))
    assert len(calls) == 1  # the policy only
    assert again == {**evaluated["result"], "model": again["model"]}


def test_saved_sft_generations_with_other_sampling_settings_are_an_error(evaluated, models, eval_file, gold_module,
                                                                         tmp_path):
    with pytest.raises(config.UserError, match="max_new_tokens 10 \\(now 12\\)"):
        run_eval(models, eval_file, gold_module, tmp_path / "c", sft_generations=str(evaluated["sft_file"]),
                 max_new_tokens=12)


def test_saved_sft_generations_of_another_model_are_an_error(evaluated, models, eval_file, gold_module, tmp_path):
    changed = f"model {models['sft']} (now {models['policy']})"
    with pytest.raises(config.UserError, match=re.escape(changed)):
        evaluate.main(evaluate.Settings(model=str(models["policy"]), sft_model=str(models["policy"]),
                                        prompts=str(eval_file), gold_fn=gold_module, output_dir=str(tmp_path / "d"),
                                        sft_generations=str(evaluated["sft_file"]), max_new_tokens=10))


def test_rerun_with_eval_json_present_does_nothing(models, eval_file, gold_module, tmp_path, monkeypatch):
    first = run_eval(models, eval_file, gold_module, tmp_path / "eval")
    monkeypatch.setattr(evaluate, "generate_responses", lambda *a, **k: pytest.fail("evaluated again"))
    assert run_eval(models, eval_file, gold_module, tmp_path / "eval") == first


def test_lc_win_rate_with_equal_lengths_is_the_plain_win_rate():
    wins = [1, 0, 1, 0.5, 1, 0, 1, 1, 0.5, 0]
    fit = evaluate.length_controlled_win_rate(wins, [0] * len(wins))
    assert fit["lc_win_rate"] == pytest.approx(sum(wins) / len(wins), abs=2e-3) and fit["slope"] == 0.0


def test_lc_win_rate_removes_a_pure_length_effect():
    """Wins drawn from P(win) = sigmoid(2 tanh(dlen / sd)), with the policy mostly longer: the plain
    win rate is well above 0.5, the length-controlled one is about 0.5 (the intercept is 0)."""
    rng = random.Random(0)
    diffs = [rng.gauss(3.0, 4.0) for _ in range(4000)]
    sd = torch.tensor(diffs).std().item()
    wins = [float(rng.random() < torch.sigmoid(torch.tensor(2 * torch.tanh(torch.tensor(d / sd)).item())).item())
            for d in diffs]
    fit = evaluate.length_controlled_win_rate(wins, diffs)
    assert sum(wins) / len(wins) > 0.65
    assert fit["lc_win_rate"] == pytest.approx(0.5, abs=0.04) and fit["slope"] == pytest.approx(2.0, abs=0.3)


def test_lc_win_rate_stays_finite_when_every_prompt_is_won():
    fit = evaluate.length_controlled_win_rate([1.0] * 20, list(range(20)))
    assert 0.9 < fit["lc_win_rate"] <= 1.0


def test_best_of_n_keeps_the_sample_the_labelling_reward_scores_highest(models, eval_file, gold_module, tmp_path):
    """toy_gold:words pays one per word: of 4 samples the longest is kept, and sample 0 is the one the
    plain evaluation draws."""
    run_eval(models, eval_file, gold_module, tmp_path / "plain")
    result = run_eval(models, eval_file, gold_module, tmp_path / "best", best_of=4, reward_fn="toy_gold:words")
    plain = files.read_jsonl(tmp_path / "plain" / "details.jsonl")
    best = files.read_jsonl(tmp_path / "best" / "details.jsonl")
    for one, kept in zip(plain, best):
        assert len(kept["best_of_scores"]) == 4 and kept["best_of_scores"][0] == len(one["output"].split())
        assert len(kept["output"].split()) == max(kept["best_of_scores"])
    assert any(k["output"] != o["output"] for o, k in zip(plain, best))
    assert result["best_of"] == 4 and result["best_of_reward"] == "toy_gold:words"


def test_best_of_n_with_the_gold_as_reward_is_a_one_line_error(models, eval_file, gold_module, tmp_path, capsys):
    with pytest.raises(SystemExit):
        config.run_main(evaluate.main, (evaluate.Settings,), argv=[
            "--model", str(models["policy"]), "--prompts", str(eval_file), "--gold_fn", gold_module,
            "--output_dir", str(tmp_path / "out"), "--best_of", "4", "--reward_fn", gold_module])
    assert capsys.readouterr().err.startswith(f"error: --best_of: the labelling reward {gold_module} is the gold")
    assert not (tmp_path / "out").exists()


def test_summarize_tabulates_the_iterations(tmp_path, capsys):
    for k, gold in ((0, 0.4), (1, 0.5), (10, 0.6)):
        folder = tmp_path / f"iter{k}" / "eval"
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps({"gold_score": gold, "length": 7.0}))
    (tmp_path / "iter1" / "label_stats.json").write_text(json.dumps(
        {"mean_length": 9.5, "share_without_eos": 0.25, "mean_length_gap": 2.0, "reward_length_correlation": 0.5}))
    table = evaluate.summarize(evaluate.SummarySettings(summarize=[str(tmp_path)]))[str(tmp_path)]
    assert [row["iteration"] for row in table] == [0, 1, 10] and table[2]["gold_score"] == 0.6
    assert table[1]["sampled/mean_length_gap"] == 2.0 and "sampled/mean_length" not in table[0]
    printed = capsys.readouterr().out
    assert "| 10 | 0.600 |" in printed and (tmp_path / "summary.md").read_text() == printed
    assert "| 1 | 0.500 | - | - | - | - | - | 7.000 | - | 9.500 | 0.250 | 2.000 | 0.500 |" in printed
    assert files.read_jsonl(tmp_path / "summary.jsonl") == json.loads(json.dumps(table))


def test_summarize_draws_a_figure_per_run_and_one_with_a_line_per_run(tmp_path):
    for run, golds in (("dpo", (0.4, 0.5, 0.3)), ("ilrdpo", (0.4, 0.6, 0.7))):
        for k, gold in enumerate(golds):
            folder = tmp_path / "runs" / run / f"iter{k}" / "eval"
            folder.mkdir(parents=True)
            (folder / "eval.json").write_text(json.dumps(
                {"gold_score": gold, "gold_score_stderr": 0.03, "lc_win_rate_vs_sft": 0.5, "length": 7.0 + k}))
    runs = [str(tmp_path / "runs" / "dpo"), str(tmp_path / "runs" / "ilrdpo")]
    tables = evaluate.summarize(evaluate.SummarySettings(summarize=runs))
    assert [row["gold_score"] for row in tables[runs[1]]] == [0.4, 0.6, 0.7]
    for path in (tmp_path / "runs" / "dpo" / "summary.png", tmp_path / "runs" / "ilrdpo" / "summary.png",
                 tmp_path / "runs" / "summary.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_missing_chosen_is_a_one_line_error(models, gold_module, tmp_path, capsys):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "list two fruits"}\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        config.run_main(evaluate.main, (evaluate.Settings,), argv=[
            "--model", str(models["sft"]), "--prompts", str(bad), "--gold_fn", gold_module,
            "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err == f"error: {bad}:1: missing field 'chosen'\n"


def test_a_rerun_after_the_gold_scorer_failed_scores_the_kept_responses_without_generating(
        models, eval_file, gold_module, tmp_path, monkeypatch):
    (tmp_path / "failing_gold.py").write_text("def score(prompts, responses):\n    raise MemoryError('gold')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls, generate = [], evaluate.generate_responses
    monkeypatch.setattr(evaluate, "generate_responses", lambda *a, **k: calls.append(1) or generate(*a, **k))
    reference = run_eval(models, eval_file, gold_module, tmp_path / "fresh")
    for out in (tmp_path / "eval", tmp_path / "other"):
        with pytest.raises(config.UserError, match="failing_gold:score raised MemoryError"):
            run_eval(models, eval_file, "failing_gold:score", out)
    assert (tmp_path / "eval" / "responses.rank0.json").is_file() and not (tmp_path / "eval" / "eval.json").exists()
    calls.clear()
    result = run_eval(models, eval_file, gold_module, tmp_path / "eval")
    assert not calls
    assert (files.read_jsonl(tmp_path / "eval" / "details.jsonl")
            == files.read_jsonl(tmp_path / "fresh" / "details.jsonl"))
    assert result["gold_score"] == reference["gold_score"]
    assert not list((tmp_path / "eval").glob("responses.rank*.json"))  # kept only until eval.json is written
    run_eval(models, eval_file, gold_module, tmp_path / "other", max_new_tokens=9)  # other settings: anew
    assert calls
