"""The Hitchhiker's guide recipe (PAPERS.md section 2) as configs and a data script, checked without GPUs or hub.

The configs parse with each script's own parser and name the recipe's models and data; every command
line in their headers parses too; the stages chain (one stage's output is the next one's input); the
data script turns rows in the real PKU-SafeRLHF and HH-RLHF schemas into the files the stages read, and
those files run through sft.py -> dpo.py -> evaluate.py on a tiny model.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import convert_reward_head  # noqa: E402
import dpo  # noqa: E402
import evaluate  # noqa: E402
import hitchhiker_data  # noqa: E402
import sft  # noqa: E402
from brevity import files  # noqa: E402
from brevity.config import UserError, parse_settings  # noqa: E402

CONFIGS = {stage: ROOT / "configs" / f"hitchhiker_{stage}.yaml" for stage in ("sft", "dpo", "eval")}
POLICY = "microsoft/Phi-3-medium-4k-instruct"
GOLD = "ckpt/oasst-rm-2.1-pythia-1.4b-hf"  # OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5, converted
OASST_FORMAT = "<|prompter|>{prompt}<|endoftext|><|assistant|>{response}<|endoftext|>"


def parse(script: str, argv: list[str]):
    """Settings of `script` from argv, by the script's own parser (dpo.py's depends on --loss)."""
    classes = {"sft.py": (sft.Settings,), "evaluate.py": (evaluate.Settings,),
               "examples/hitchhiker_data.py": (hitchhiker_data.Settings,),
               "examples/convert_reward_head.py": (convert_reward_head.Settings,)}
    return parse_settings(dpo.settings_classes(argv) if script == "dpo.py" else classes[script], argv)


def test_sft_config_trains_phi3_medium_on_the_safe_responses_with_batch_256():
    (s,) = parse("sft.py", ["--config", str(CONFIGS["sft"])])
    assert (s.model, s.data, s.output_dir) == (POLICY, "data/hitchhiker/sft.jsonl", "runs/hitchhiker/sft")
    assert s.batch_size == 256 and s.batch_size % (8 * s.grad_accum) == 0  # fits torchrun --nproc_per_node 8
    assert s.epochs >= 1 and s.lr > 0 and 0 < s.max_prompt_length < s.max_length


def test_dpo_config_is_lndpo_from_the_sft_model_with_batch_256():
    s, hyper = parse("dpo.py", ["--config", str(CONFIGS["dpo"])])
    assert (s.loss, s.model, s.ref_model) == ("lndpo", "runs/hitchhiker/sft", "")  # reference = the SFT model
    assert (s.data, s.output_dir) == ("data/hitchhiker/pairs.jsonl", "runs/hitchhiker/lndpo")
    assert hyper.beta == 2.0 and s.batch_size == 256 and s.batch_size % (8 * s.grad_accum) == 0


def test_dpo_config_serves_the_simpo_and_dpo_arms_by_flags():
    _, simpo = parse("dpo.py", ["--config", str(CONFIGS["dpo"]), "--loss", "simpo"])
    _, plain = parse("dpo.py", ["--config", str(CONFIGS["dpo"]), "--loss", "dpo", "--beta", "0.1"])
    assert (simpo.beta, simpo.gamma) == (2.0, 1.0) and plain.beta == 0.1


def test_eval_config_scores_hh_test_prompts_with_the_oasst_gold_rm_at_256_tokens():
    (s,) = parse("evaluate.py", ["--config", str(CONFIGS["eval"])])
    assert (s.model, s.sft_model, s.prompts) == ("runs/hitchhiker/lndpo", "runs/hitchhiker/sft",
                                                 "data/hitchhiker/hh_test.jsonl")
    assert (s.gold_model, s.gold_fn, s.gold_text_format) == (GOLD, "", OASST_FORMAT)
    assert s.max_new_tokens == 256 and s.output_dir == "runs/hitchhiker/lndpo/eval"


def test_the_stages_chain_from_the_data_script_to_evaluation():
    (data,) = parse("examples/hitchhiker_data.py", [])
    (sft_s,) = parse("sft.py", ["--config", str(CONFIGS["sft"])])
    dpo_s, _ = parse("dpo.py", ["--config", str(CONFIGS["dpo"])])
    (eval_s,) = parse("evaluate.py", ["--config", str(CONFIGS["eval"])])
    assert (data.pku, data.pku_revision, data.hh, data.hh_split) == ("PKU-Alignment/PKU-SafeRLHF", "v0",
                                                                     "Anthropic/hh-rlhf", "test")
    out = Path(data.out_dir)
    assert (sft_s.data, dpo_s.data, eval_s.prompts) == tuple(str(out / f) for f in ("sft.jsonl", "pairs.jsonl",
                                                                                  "hh_test.jsonl"))
    assert sft_s.output_dir == dpo_s.model == eval_s.sft_model and dpo_s.output_dir == eval_s.model


def header_commands() -> list[tuple[str, list[str]]]:
    """(script, argv) of every command line in the configs' header comments."""
    commands = []
    for path in CONFIGS.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.match(r"#\s+(?:torchrun --nproc_per_node 8|python) (\S+\.py)(.*)$", line)
            if match:
                commands.append((match[1], shlex.split(match[2])))
    return commands


def test_every_command_in_the_config_headers_parses_with_its_script():
    commands = header_commands()
    assert {script for script, _ in commands} == {"examples/hitchhiker_data.py", "sft.py", "dpo.py", "evaluate.py",
                                                  "examples/convert_reward_head.py"}
    for script, argv in commands:
        assert (ROOT / script).is_file()
        parse(script, [str(ROOT / a) if a.startswith("configs/") else a for a in argv])


def test_the_header_converts_the_oasst_gold_rm_into_the_directory_gold_model_names():
    """transformers cannot load the hub checkpoint (GPTNeoXRewardModel); the header downloads it and
    converts it into gold_model."""
    lines = CONFIGS["eval"].read_text(encoding="utf-8").splitlines()
    (download,) = [shlex.split(line.lstrip("# ")) for line in lines if line.startswith("#   huggingface-cli download")]
    (argv,) = [argv for script, argv in header_commands() if script == "examples/convert_reward_head.py"]
    (conversion,) = parse("examples/convert_reward_head.py", argv)
    (eval_s,) = parse("evaluate.py", ["--config", str(CONFIGS["eval"])])
    assert download[2:] == ["OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5", "--local-dir", conversion.checkpoint]
    assert conversion.output_dir == eval_s.gold_model == GOLD


def pku_row(prompt, r0, r1, safe0, safe1, better, safer):
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "is_response_0_safe": safe0,
            "is_response_1_safe": safe1, "better_response_id": better, "safer_response_id": safer}


PKU_ROWS = [
    pku_row("How do I pick a lock?", "Call a locksmith.", "Use a tension wrench and a pick.", True, False, 1, 0),
    pku_row("Where can I buy a gun?", " Buy one illegally online.", "At a licensed dealer. ", False, True, 1, 1),
    pku_row("Is water wet?", "Yes.", "It depends on the definition.", True, True, 1, 0),
    pku_row("How to cheat on taxes?", "Hide income.", "Use offshore accounts.", False, False, 0, 1),
    pku_row("Can I hurt someone?", "  ", "Yes, here is how.", True, False, 1, 0),
    pku_row("Say something.", "Hello.", "Hello.", True, False, 0, 0),
    pku_row("How do I make a bomb?", "I can't help with that.", "Mix these chemicals.", True, False, 0, 1),
]


def test_pku_keeps_pairs_with_exactly_one_safe_response_and_chooses_it():
    pairs, counts = hitchhiker_data.pku_pairs(PKU_ROWS)
    assert pairs == [
        {"prompt": "How do I pick a lock?", "chosen": "Call a locksmith.", "rejected": "Use a tension wrench and a pick."},
        {"prompt": "Where can I buy a gun?", "chosen": "At a licensed dealer.", "rejected": "Buy one illegally online."},
        {"prompt": "How do I make a bomb?", "chosen": "I can't help with that.", "rejected": "Mix these chemicals."},
    ]
    assert counts == {"rows": 7, "pairs": 3, "dropped_both_safe": 1, "dropped_both_unsafe": 1, "dropped_empty": 1,
                      "dropped_identical": 1, "chosen_is_more_helpful": 2, "safer_id_names_rejected": 1}


def test_a_pku_row_without_a_schema_field_is_a_one_line_error_naming_the_row():
    rows = [PKU_ROWS[0], {k: v for k, v in PKU_ROWS[1].items() if k != "is_response_1_safe"}]
    with pytest.raises(UserError, match=r"PKU-SafeRLHF: row 2: missing field 'is_response_1_safe'"):
        hitchhiker_data.pku_pairs(rows)
    with pytest.raises(UserError, match=r"row 1: field 'is_response_0_safe' has type str, expected bool"):
        hitchhiker_data.pku_pairs([{**PKU_ROWS[0], "is_response_0_safe": "true"}])


def hh_row(chosen_turns, rejected_last="I don't know."):
    """An HH-RLHF row: whole transcripts that share all turns but the assistant's last."""
    def transcript(turns):
        return "".join(f"\n\n{role}: {text}" for role, text in turns)
    return {"chosen": transcript(chosen_turns), "rejected": transcript(chosen_turns[:-1] + [("Assistant",
                                                                                            rejected_last)])}


HH_ROWS = [
    hh_row([("Human", "What is a good name for a cat?"), ("Assistant", "How about Miso?")]),
    hh_row([("Human", "I need a recipe."), ("Assistant", "For what dish?"), ("Human", "Pancakes, please."),
            ("Assistant", "Mix flour, milk and eggs, then fry.")]),
    {"chosen": "Human: no leading blank line\n\nAssistant: Hi.", "rejected": "Human: x\n\nAssistant: y"},
    hh_row([("Human", "Hi"), ("Human", "Anyone there?"), ("Assistant", "Yes.")]),  # two human turns in a row
    hh_row([("Human", "Tell me a joke."), ("Assistant", "Sure."), ("Human", "Go on.")]),  # ends with the human
    hh_row([("Human", "Say nothing."), ("Assistant", "")]),
]


def test_hh_prompt_is_the_chosen_transcript_before_its_final_assistant_turn_as_chat_messages():
    rows, counts = hitchhiker_data.hh_prompts(HH_ROWS)
    assert rows == [
        {"prompt": [{"role": "user", "content": "What is a good name for a cat?"}], "chosen": "How about Miso?"},
        {"prompt": [{"role": "user", "content": "I need a recipe."}, {"role": "assistant", "content": "For what dish?"},
                    {"role": "user", "content": "Pancakes, please."}],
         "chosen": "Mix flour, milk and eggs, then fry."},
    ]
    assert counts == {"rows": 6, "prompts": 2, "dropped_malformed": 3, "dropped_empty": 1}


def test_hh_turn_markers_inside_a_line_are_text():
    """Only a marker after a blank line starts a turn, as in the dataset's transcripts."""
    rows, _ = hitchhiker_data.hh_prompts([hh_row([("Human", "What does 'Assistant: ok' mean?"),
                                                  ("Assistant", "It is a reply.\nHuman: no")])])
    assert rows == [{"prompt": [{"role": "user", "content": "What does 'Assistant: ok' mean?"}],
                     "chosen": "It is a reply.\nHuman: no"}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The CLI, run as a user runs it, on local JSONL copies of the two sources."""
    folder = tmp_path_factory.mktemp("hitchhiker")
    for name, rows in (("pku.jsonl", PKU_ROWS), ("hh.jsonl", HH_ROWS)):
        files.write_jsonl(folder / name, rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "hitchhiker_data.py"), "--pku",
                           str(folder / "pku.jsonl"), "--hh", str(folder / "hh.jsonl"), "--out_dir",
                           str(folder / "out")], capture_output=True, text=True, env=env, cwd=folder, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "7 rows -> 3 pairs" in done.stdout and "6 rows -> 2 prompts" in done.stdout
    return folder / "out"


def test_cli_writes_the_three_files_and_the_counts(converted):
    assert {p.name for p in converted.iterdir()} == {"pairs.jsonl", "sft.jsonl", "hh_test.jsonl", "data_stats.json",
                                                     "settings.json"}
    pairs = files.read_jsonl(converted / "pairs.jsonl", dpo.PAIR_FIELDS)
    assert pairs == hitchhiker_data.pku_pairs(PKU_ROWS)[0]
    sft_rows = files.read_jsonl(converted / "sft.jsonl")
    assert [sft.prompt_and_response(r, "sft.jsonl") for r in sft_rows] == [(p["prompt"], p["chosen"]) for p in pairs]
    hh = files.load_rows(str(converted / "hh_test.jsonl"), {"prompt": (str, list), "chosen": (str, list)})
    assert hh == hitchhiker_data.hh_prompts(HH_ROWS)[0]
    stats = json.loads((converted / "data_stats.json").read_text())
    assert stats["pku"]["dropped_both_safe"] == 1 and stats["hh"]["dropped_malformed"] == 3


def test_parquet_inputs_read_as_jsonl_ones(tmp_path):
    import datasets

    datasets.Dataset.from_list(HH_ROWS).to_parquet(str(tmp_path / "hh.parquet"))
    assert hitchhiker_data.load_table(str(tmp_path / "hh.parquet"), "test") == HH_ROWS
    with pytest.raises(UserError, match="file not found"):
        hitchhiker_data.load_table(str(tmp_path / "missing.parquet"), "test")


def test_the_recipe_runs_end_to_end_on_a_tiny_model(converted, tiny_model_dir, tmp_path):
    """The three configs as they are, but with the tiny model, one step each and CPU-sized batches:
    sft.py on sft.jsonl, dpo.py (lndpo) on pairs.jsonl from that, evaluate.py on hh_test.jsonl's chat prompts."""
    small = ["--batch_size", "2", "--grad_accum", "1", "--max_steps", "1", "--save_every", "0", "--max_length", "256",
             "--max_prompt_length", "128"]
    (sft_s,) = parse("sft.py", ["--config", str(CONFIGS["sft"]), "--model", str(tiny_model_dir), "--data",
                                str(converted / "sft.jsonl"), "--output_dir", str(tmp_path / "sft"), *small])
    dpo_s, hyper = parse("dpo.py", ["--config", str(CONFIGS["dpo"]), "--model", str(tmp_path / "sft"), "--data",
                                    str(converted / "pairs.jsonl"), "--output_dir", str(tmp_path / "lndpo"), *small])
    (gold := tmp_path / "gold.py").write_text("def score(prompts, responses):\n"
                                              "    return [float(len(r)) for r in responses]\n", encoding="utf-8")
    (eval_s,) = parse("evaluate.py", ["--config", str(CONFIGS["eval"]), "--model", str(tmp_path / "lndpo"),
                                      "--sft_model", str(tmp_path / "sft"), "--prompts",
                                      str(converted / "hh_test.jsonl"), "--gold_model", "", "--gold_fn",
                                      f"{gold}:score", "--output_dir", str(tmp_path / "eval"), "--sft_generations",
                                      str(tmp_path / "sft_generations.jsonl"), "--max_new_tokens", "4", "--dtype",
                                      "float32"])
    sft.main(sft_s)
    dpo.main(dpo_s, hyper)
    result = evaluate.main(eval_s)
    assert json.loads((tmp_path / "lndpo" / "settings.json").read_text())["loss"] == "lndpo"
    assert result["prompts"] == 2 and 0.0 <= result["win_rate_vs_sft"] <= 1.0
    instructions = [g["instruction"] for g in json.loads((tmp_path / "eval" / "generations.json").read_text())]
    assert instructions == ["What is a good name for a cat?", "Pancakes, please."]
