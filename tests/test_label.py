"""label.py: a reward model read through its own tokenizer and template, batched = one by one; a
reward function by module:function; best-vs-worst pairs with ties, unfinished and empty responses
dropped and counted; bad input is a one-line error; pairs.jsonl is what dpo.py reads."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_word_tokenizer, save_word_model, write_jsonl

from brevity import config, files, scoring
import label

RM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q {{ m['content'] }}{% else %} "
               "A {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
RM_WORDS = "Q A fruits colors apple pear plum red blue green and or list name give two three".split()


def rm_tokenizer():
    """The reward model's own word-level tokenizer: another vocabulary and template than any policy's,
    and pad = EOS, so every conversation ends with the pad id (the case transformers gets wrong)."""
    return make_word_tokenizer(["<unk>", "<eos>", *reversed(RM_WORDS)], RM_TEMPLATE, eos_token="<eos>",
                               pad_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    """A tiny LlamaForSequenceClassification (one label) saved with its tokenizer: the real loading path."""
    return save_word_model(tmp_path_factory.mktemp("rm") / "rm", rm_tokenizer(),
                           model_class="LlamaForSequenceClassification", num_labels=1)


def response(text: str, finish: str = "eos") -> dict:
    return {"text": text, "num_tokens": len(text.split()) + (finish == "eos"), "finish_reason": finish}


SAMPLES = [
    {"prompt": "list two fruits", "responses": [response("apple"), response("apple and pear"), response("plum")]},
    {"prompt": [{"role": "user", "content": "name three colors"}],
     "responses": [response("red blue green"), response("red"), response("blue or green or red")]},
    {"prompt": "give two colors", "responses": [response("red and blue and green", "length"), response("blue")]},
]


@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> str:
    """A reward module on sys.path: `length` pays one per word, `constant` ties everything, `broken` is NaN
    for the response "red" (row 2's second)."""
    (tmp_path / "toy_rewards.py").write_text(
        "def length(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
        "def constant(prompts, responses):\n    return [1.0 for _ in responses]\n"
        "def broken(prompts, responses):\n    return [float('nan') if r == 'red' else 0.0 for r in responses]\n"
        "def seen(prompts, responses):\n    seen.calls.append(list(prompts))\n"
        "    return [float(i) for i in range(len(responses))]\n"
        "seen.calls = []\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_rewards", None)
    return "toy_rewards"


def run_label(tmp_path, rows=SAMPLES, **overrides) -> dict:
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    return label.main(label.Settings(samples=str(samples), **overrides))


def test_reward_model_batched_scores_equal_one_by_one_at_the_last_real_token(rm_dir):
    """Scores from padded batches of 4 equal scores of single sequences, and both equal the score head
    applied by hand to the last position of the unpadded conversation (whose last token is the pad id)."""
    rm = scoring.RewardModel(str(rm_dir), torch.device("cpu"), torch.float32, batch_size=4)
    prompts = [s["prompt"] for s in SAMPLES for _ in s["responses"]] * 2
    responses = [r["text"] for s in SAMPLES for r in s["responses"]] * 2
    batched = rm(prompts, responses)
    rm.batch_size = 1
    single = rm(prompts, responses)
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-5)
    by_hand = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([rm.encode(p, r)])
        assert ids[0, -1].item() == rm.tokenizer.pad_token_id
        hidden = rm.model.model(input_ids=ids).last_hidden_state[0, -1]
        by_hand.append(rm.model.score(hidden).item())
    assert torch.allclose(torch.tensor(batched), torch.tensor(by_hand), atol=1e-5)
    assert rm.model.config.pad_token_id == rm.tokenizer.pad_token_id  # restored after the call


def test_reward_model_reads_the_conversation_in_its_own_template(rm_dir):
    rm = scoring.RewardModel(str(rm_dir), torch.device("cpu"), torch.float32)
    ids = rm.encode([{"role": "user", "content": "list two fruits"}], "apple and pear")
    assert rm.tokenizer.decode(ids) == "Q list two fruits A apple and pear <eos>"


def test_text_format_reads_backslash_n_as_a_newline(rm_dir):
    """A flag or a recipe line cannot hold a newline; Starling-RM-34B's format needs several."""
    prompt = [{"role": "user", "content": "list two fruits"}]
    cpu = torch.device("cpu")
    escaped = scoring.RewardModel(str(rm_dir), cpu, torch.float32, text_format=r"Q\n{prompt}\nA\n{response}<eos>")
    spaced = scoring.RewardModel(str(rm_dir), cpu, torch.float32, text_format="Q {prompt} A {response} <eos>")
    assert escaped.encode(prompt, "apple and pear") == spaced.encode(prompt, "apple and pear")
    assert rm_tokenizer().unk_token_id not in escaped.encode(prompt, "apple and pear")


def test_label_with_a_reward_model_directory_writes_its_scores(rm_dir, tmp_path):
    stats = run_label(tmp_path, reward_model=str(rm_dir), batch_size=3, compute_dtype="float32")
    rm = scoring.RewardModel(str(rm_dir), torch.device("cpu"), torch.float32, batch_size=1)
    rows = files.read_jsonl(tmp_path / "scores.jsonl")
    expected = rm([s["prompt"] for s in SAMPLES for _ in s["responses"]],
                  [r["text"] for s in SAMPLES for r in s["responses"]])
    assert [r["score"] for row in rows for r in row["responses"]] == pytest.approx(expected, abs=1e-5)
    assert stats["responses_scored"] == 8
    pairs = files.read_jsonl(tmp_path / "pairs.jsonl")
    assert len(pairs) == stats["pairs_written"] > 0
    for pair in pairs:  # best and worst of the row's finished responses, by the model's scores
        (row,) = [row for row in rows if row["prompt"] == pair["prompt"]]
        finished = [r for r in row["responses"] if r["finish_reason"] == "eos"]
        assert pair["chosen_score"] == max(r["score"] for r in finished) > pair["rejected_score"]
        assert pair["rejected_score"] == min(r["score"] for r in finished)


def test_reward_function_by_module_path_pairs_best_with_worst(tmp_path, reward_module):
    stats = run_label(tmp_path, reward_fn=f"{reward_module}:length")
    pairs = files.read_jsonl(tmp_path / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("apple and pear", "apple"),
                                                            ("blue or green or red", "red")]
    assert pairs[0] | {"prompt": None} == {
        "prompt": None, "chosen": "apple and pear", "rejected": "apple", "chosen_score": 3.0, "rejected_score": 1.0,
        "reward_gap": 2.0, "chosen_length": 4, "rejected_length": 2, "length_gap": 2}
    assert pairs[1]["prompt"] == SAMPLES[1]["prompt"]  # chat prompts are kept as they are
    assert stats["mean_length_gap"] == 3.0 and stats["share_chosen_longer"] == 1.0
    assert stats["reward_length_correlation"] > 0.9  # not 1: the cut response has no EOS token to count


def test_reward_function_gets_the_user_prompt_text(tmp_path, reward_module):
    run_label(tmp_path, reward_fn=f"{reward_module}:seen")
    calls = sys.modules[reward_module].seen.calls  # one call (8 responses, --batch_size 16), longest first
    assert len(calls) == 1 and sorted(calls[0]) == sorted(["list two fruits"] * 3 + ["name three colors"] * 3
                                                          + ["give two colors"] * 2)


def test_reward_function_from_a_file_path(tmp_path, reward_module):
    run_label(tmp_path, reward_fn=f"{tmp_path / 'toy_rewards.py'}:length")
    assert [(p["chosen"], p["rejected"]) for p in files.read_jsonl(tmp_path / "pairs.jsonl")] == [
        ("apple and pear", "apple"), ("blue or green or red", "red")]


SAME_TEXT_TWICE = SAMPLES + [{"prompt": "list two fruits", "responses": [response("pear"), response("pear")]}]


def test_ties_are_dropped_and_counted(tmp_path, reward_module):
    """Every score equal: no pair survives, the error says so and label_stats.json counts the 3 ties
    (the row with one finished response is not a tie)."""
    with pytest.raises(config.UserError, match="no pair survived"):
        run_label(tmp_path, SAME_TEXT_TWICE, reward_fn=f"{reward_module}:constant")
    stats = json.loads((tmp_path / "label_stats.json").read_text())
    assert stats["dropped_ties"] == 3 and stats["pairs_written"] == 0 and not (tmp_path / "pairs.jsonl").exists()


def test_the_same_text_as_best_and_worst_is_a_tie_whatever_the_scores():
    """Two responses with the same text and different scores (8 and 9), as a reward that is not a
    function of the text could give: best and worst are the same text, so the prompt is a tie."""
    row = {"prompt": "list two fruits", "responses": [{**response("pear"), "score": 8.0},
                                                      {**response("pear"), "score": 9.0}]}
    pairs, drops = label.make_pairs(row, 0, label.Settings())
    assert pairs == [] and drops == {"tie": 1, "below_margin": 0, "fewer_than_two": 0}


def test_the_same_text_twice_is_scored_once_and_its_prompt_is_a_tie(tmp_path, reward_module):
    """label.py keeps one score per (prompt, text): the two "pear" responses share it, and the prompt
    is dropped as a tie."""
    stats = run_label(tmp_path, SAME_TEXT_TWICE, reward_fn=f"{reward_module}:seen")
    scores = files.read_jsonl(tmp_path / "scores.jsonl")[3]["responses"]
    assert scores[0]["score"] == scores[1]["score"]
    assert stats["dropped_ties"] == 1 and stats["pairs_written"] == 2
    assert "pear" not in [p["chosen"] for p in files.read_jsonl(tmp_path / "pairs.jsonl")]


CUT_AND_EMPTY = [{"prompt": "give two colors", "responses": [response("red and blue and green", "length"),
                                                             response("blue"), response("")]}]


def test_unfinished_and_empty_responses_are_dropped_by_default(tmp_path, reward_module):
    with pytest.raises(config.UserError, match="1 with fewer than two usable"):
        run_label(tmp_path, CUT_AND_EMPTY, reward_fn=f"{reward_module}:length")
    stats = json.loads((tmp_path / "label_stats.json").read_text())
    assert stats["dropped_unfinished"] == 1 and stats["dropped_empty"] == 1
    assert stats["share_without_eos"] == pytest.approx(1 / 3)


def test_keep_unfinished_pairs_a_response_cut_at_max_new_tokens(tmp_path, reward_module):
    run_label(tmp_path, CUT_AND_EMPTY, reward_fn=f"{reward_module}:length", keep_unfinished=True)
    (pair,) = files.read_jsonl(tmp_path / "pairs.jsonl")
    assert (pair["chosen"], pair["rejected"]) == ("red and blue and green", "blue")


def test_pairs_below_the_margin_are_dropped(tmp_path, reward_module):
    stats = run_label(tmp_path, reward_fn=f"{reward_module}:length", min_margin=2.5)
    assert stats["pairs_written"] == 1 and stats["dropped_below_margin"] == 1


def test_pairs_file_is_what_dpo_reads(tmp_path, reward_module, tiny_tokenizer):
    """dpo.py's own reader accepts pairs.jsonl, and every row becomes a training pair: its prompt
    (a string or chat messages) and its chosen and rejected texts, encoded as dpo.py encodes them."""
    import dpo

    run_label(tmp_path, reward_fn=f"{reward_module}:length")
    rows = files.load_rows(str(tmp_path / "pairs.jsonl"), dpo.PAIR_FIELDS)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (SAMPLES[0]["prompt"], "apple and pear", "apple"), (SAMPLES[1]["prompt"], "blue or green or red", "red")]
    pairs, stats = dpo.encode_pairs(rows, tiny_tokenizer, dpo.Settings())
    assert stats["pairs"] == len(rows) == 2
    assert pairs[1][1] == tiny_tokenizer("blue or green or red", add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id]


def test_rerun_with_outputs_present_does_nothing(tmp_path, reward_module):
    """Not even the reward runs again: `broken` would be an error."""
    run_label(tmp_path, reward_fn=f"{reward_module}:length")
    before = {name: (tmp_path / name).read_bytes() for name in ("scores.jsonl", "pairs.jsonl", "label_stats.json")}
    assert run_label(tmp_path, reward_fn=f"{reward_module}:broken") is None
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        config.run_main(label.main, (label.Settings,), argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_nan_score_is_a_one_line_error_naming_the_row(tmp_path, reward_module, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    err = one_line_error(capsys, ["--samples", str(samples), "--reward_fn", f"{reward_module}:broken"])
    assert "row 2: response 2 got score nan" in err


def test_missing_field_is_a_one_line_error_naming_the_line(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", [SAMPLES[0], {"prompt": "list two fruits"}])
    err = one_line_error(capsys, ["--samples", str(samples), "--reward_fn", "embedded:proxy_reward"])
    assert "samples.jsonl:2: missing field 'responses'" in err


def test_a_response_without_its_fields_is_a_one_line_error_naming_row_and_response(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "x", "responses": [{"text": "a"}]}])
    assert "row 1: response 1 needs" in one_line_error(capsys, ["--samples", str(samples), "--reward_fn", "a:b"])


def test_a_reward_module_that_does_not_import_is_a_one_line_error(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    assert "cannot import no_such_module" in one_line_error(
        capsys, ["--samples", str(samples), "--reward_fn", "no_such_module:f"])


def test_neither_reward_function_nor_reward_model_is_a_one_line_error(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    assert "exactly one of" in one_line_error(capsys, ["--samples", str(samples)])
