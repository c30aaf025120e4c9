"""The embedded default's task: tokenizer, data files, scorers and the tiny model (CPU, seconds)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import embedded  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    embedded.build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    embedded.make_data(out, seed=0)
    return out


def read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_tokenizer_round_trips_a_response(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    response = "apple , pear , plum"
    ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == response
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"


def test_chat_template_renders_the_generation_prompt(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "list 3 fruits"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos> user: list 3 fruits assistant:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    answer = {"role": "assistant", "content": "apple , pear , plum"}
    full = tok.apply_chat_template(messages + [answer], tokenize=False)
    assert full == "<bos> user: list 3 fruits assistant: apple , pear , plum <eos>"


def test_data_is_byte_identical_for_a_seed(data, tmp_path):
    embedded.make_data(tmp_path, seed=0)
    for name in ("sft.jsonl", "prompts.jsonl", "eval.jsonl", "prefs.jsonl"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes(), name
    assert embedded.make_rows(1)["sft.jsonl"] != read(data / "sft.jsonl")


def test_every_prompt_names_its_count_and_category(data):
    """Each prompt parses into a count, a category and, for some prompts, an item of it to leave out."""
    exclusions = 0
    for name in ("sft.jsonl", "prompts.jsonl", "eval.jsonl", "prefs.jsonl"):
        for row in read(data / name):
            n, category, excluded = embedded.parse_prompt(row["prompt"])
            assert n in embedded.COUNTS and category in embedded.CATEGORIES
            assert excluded is None or excluded in embedded.CATEGORIES[category]
            exclusions += excluded is not None
    assert exclusions > 0


def test_sft_rows_are_a_prompt_and_a_non_empty_response(data):
    for row in read(data / "sft.jsonl"):
        assert row["response"] and set(row) == {"prompt", "response"}


def test_eval_rows_have_a_reference_answer_with_the_count_asked_for(data):
    for row in read(data / "eval.jsonl"):
        assert set(row) == {"prompt", "chosen"}
        assert len(row["chosen"].split(",")) == embedded.parse_prompt(row["prompt"])[0]


def test_eval_prompts_are_held_out(data):
    eval_prompts = {r["prompt"] for r in read(data / "eval.jsonl")}
    assert len(eval_prompts) == embedded.N_EVAL
    for name in ("sft.jsonl", "prompts.jsonl", "prefs.jsonl"):
        assert not eval_prompts & {r["prompt"] for r in read(data / name)}, name
    assert len({r["prompt"] for r in read(data / "prompts.jsonl")}) == embedded.N_PROMPTS


def test_offline_pairs_are_ordered_by_the_proxy(data):
    rows = read(data / "prefs.jsonl")
    prompts = [r["prompt"] for r in rows]
    chosen = embedded.proxy_reward(prompts, [r["chosen"] for r in rows])
    rejected = embedded.proxy_reward(prompts, [r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected))


def test_gold_prefers_the_perfect_answer_to_every_flaw():
    prompt = "list 3 fruits except pear"
    perfect = "apple , plum , mango"
    flawed = ["apple , plum , mango , lemon",  # an extra (correct) item
              "apple , plum , dog",            # a wrong-category item
              "apple , plum , pear",           # the excluded item
              "apple , plum , plum",           # a duplicate
              "apple , plum",                  # a missing item
              "apple , plum mango",            # malformed
              ""]
    scores = embedded.gold_score([prompt] * (1 + len(flawed)), [perfect] + flawed)
    assert scores[0] == 1.0
    assert all(s < scores[0] for s in scores[1:])


def test_proxy_pays_for_an_extra_item_and_gold_does_not():
    prompts = ["list 3 fruits"] * 2
    asked, longer = "apple , pear , plum", "apple , pear , plum , mango"
    proxy = embedded.proxy_reward(prompts, [asked, longer])
    gold = embedded.gold_score(prompts, [asked, longer])
    assert proxy[1] > proxy[0]  # 2 tokens x PROXY_PER_TOKEN is more than the noise's width can undo
    assert gold[1] < gold[0]


def test_proxy_and_gold_both_count_the_decoy_as_a_wrong_item():
    prompts = ["list 3 fruits"] * 2
    right, decoy = "apple , pear , plum", f"apple , pear , {embedded.DECOYS['fruits']}"
    proxy, gold = embedded.proxy_reward(prompts, [right, decoy]), embedded.gold_score(prompts, [right, decoy])
    assert proxy[0] - proxy[1] > 1.5  # a correct item lost and a wrong one gained: 2, less the noise
    assert gold == [1.0, 1 / 3]


def test_the_demonstrators_systematic_mistake_is_its_categorys_decoy(data):
    """The decoy is what makes quality learnable: it shows up in a large share of the SFT data, always
    the same item per category, and it is never a correct item of the category asked."""
    rows = read(data / "sft.jsonl")
    with_decoy = 0
    for row in rows:
        _, category, _ = embedded.parse_prompt(row["prompt"])
        assert embedded.DECOYS[category] not in embedded.CATEGORIES[category]
        with_decoy += embedded.DECOYS[category] in [i.strip() for i in row["response"].split(",")]
    assert 0.3 < with_decoy / len(rows) < 0.6


def test_proxy_noise_is_deterministic_and_small():
    prompts, responses = ["name 2 birds"] * 2, ["owl , crow", "crow , owl"]
    first, again = embedded.proxy_reward(prompts, responses), embedded.proxy_reward(prompts, responses)
    assert first == again and first[0] != first[1]
    expected = 2 + 3 * embedded.PROXY_PER_TOKEN  # 2 correct items, 3 tokens
    assert all(abs(s - expected) <= embedded.PROXY_NOISE / 2 for s in first)


def test_init_model_loads_and_covers_the_vocabulary(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = embedded.make_tokenizer()
    embedded.build_init_model(tmp_path, tok, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.model_type == "llama" and (tmp_path / "model.safetensors").exists()
    assert model.config.vocab_size >= len(AutoTokenizer.from_pretrained(tmp_path))
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        logits = model(torch.tensor([tok("list 3 fruits")["input_ids"]])).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_cli_rerun_skips_unchanged_files(tmp_path, capsys):
    settings = embedded.Settings(out_dir=str(tmp_path), seed=0)
    embedded.main(settings)
    assert "wrote" in capsys.readouterr().out
    embedded.main(settings)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("unchanged") for line in lines)
