"""The Storm-7B recipe's prompts (examples/nectar_prompts.py) and reward format, checked without hub or GPU.

Rows in Nectar's schema become chat-message prompts that sample.py reads; malformed, empty, multi-turn
and repeated prompts are dropped and counted; the recipe's Starling text format is the card's string.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import nectar_prompts  # noqa: E402
from brevity import config, files  # noqa: E402
from brevity.config import UserError  # noqa: E402


def nectar_row(prompt: str) -> dict:
    """A row in Nectar's schema (only `prompt` is read)."""
    return {"prompt": prompt, "answers": [{"answer": "a", "model": "gpt-4", "rank": 1.0}], "turns": 1,
            "num_responses": 1, "source": ["sharegpt"], "good_natured": True}


ROWS = [
    nectar_row("\n\nHuman: Name three fruits.\n\nAssistant:"),
    nectar_row("\n\nHuman: Hi\n\nAssistant: Hello! What do you need?\n\nHuman: A poem about rain.\n\nAssistant:"),
    nectar_row("Human: Name three fruits.\n\nAssistant:"),  # the first again, without the leading blank line
    nectar_row("Tell me a joke."),  # not a transcript
    nectar_row("\n\nHuman: Why?\n\nAssistant: Because."),  # the assistant already answered: nothing to sample
    nectar_row("\n\nHuman:   \n\nAssistant:"),  # blank user turn
    nectar_row("\n\nHuman: Sum 2 and 3.\n\nAssistant:"),
]


def test_single_turn_prompts_become_chat_messages_and_the_rest_is_counted():
    prompts, counts = nectar_prompts.nectar_prompts(ROWS)
    assert prompts == [{"prompt": [{"role": "user", "content": "Name three fruits."}], "nectar_index": 0},
                       {"prompt": [{"role": "user", "content": "Sum 2 and 3."}], "nectar_index": 6}]
    assert counts == dict(rows=7, prompts=2, dropped_malformed=2, dropped_empty=1, dropped_multi_turn=1,
                          dropped_duplicate=1)


def test_max_turns_zero_keeps_a_conversation_ending_with_the_user():
    prompts, counts = nectar_prompts.nectar_prompts(ROWS, max_turns=0)
    assert prompts[1]["prompt"] == [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello! What do you need?"},
                                    {"role": "user", "content": "A poem about rain."}]
    assert counts["prompts"] == 3 and counts["dropped_multi_turn"] == 0


def test_a_row_without_a_prompt_is_a_one_line_error_naming_the_row():
    with pytest.raises(UserError, match=r"Nectar: row 2: missing field 'prompt'"):
        nectar_prompts.nectar_prompts([ROWS[0], {"answers": []}])


def test_cli_on_a_local_file_writes_what_sample_reads(tmp_path):
    source = tmp_path / "nectar.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out dir"
    cmd = [sys.executable, str(ROOT / "examples" / "nectar_prompts.py"), "--nectar", str(source),
           "--out_dir", str(out), "--max_turns", "0", "--num_prompts", "2", "--seed", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr
    rows = files.load_rows(str(out / "prompts.jsonl"), {"prompt": files.PROMPT})
    assert len(rows) == 2 and [r["nectar_index"] for r in rows] == sorted(r["nectar_index"] for r in rows)
    stats = json.loads((out / "data_stats.json").read_text())
    assert (stats["prompts"], stats["written"]) == (3, 2)
    again = subprocess.run(cmd, capture_output=True, text=True)  # the same seed picks the same sample
    assert again.returncode == 0 and files.read_jsonl(str(out / "prompts.jsonl")) == rows


def test_the_recipe_reads_its_prompts_and_scores_with_the_starling_card_format():
    recipe = dict(line.split("=", 1) for line in (ROOT / "configs" / "storm7b.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert recipe["PROMPTS"] == "data/storm7b/prompts.jsonl"  # what the header's command writes
    flag, text_format = recipe["LABEL_ARGS"].split(" ")
    assert flag == "--text_format"
    card = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi, how can I help?<|im_end|>"
    assert text_format.replace("\\n", "\n").format(prompt="Hello!", response="Hi, how can I help?") == card


def test_every_command_in_the_recipe_comments_parses_with_its_script():
    import shlex

    import convert_reward_head

    classes = {"examples/nectar_prompts.py": nectar_prompts.Settings,
               "examples/convert_reward_head.py": convert_reward_head.Settings}
    lines = (ROOT / "configs" / "storm7b.env").read_text().splitlines()
    commands = [shlex.split(line.lstrip("# ")) for line in lines if line.startswith("#   python examples/")]
    assert sorted(c[1] for c in commands) == sorted(["examples/nectar_prompts.py"] +
                                                    ["examples/convert_reward_head.py"] * 2)  # labeller and gold RM
    for argv in commands:
        config.parse_settings((classes[argv[1]],), argv[2:])


def test_the_recipe_converts_its_reward_models_into_the_directories_it_names():
    """Starling-RM-34B (REWARD) and the OASST gold RM (GOLD) ship as custom code: each is downloaded into a
    directory the conversion reads and converted into the one the recipe names."""
    import shlex

    import convert_reward_head

    lines = (ROOT / "configs" / "storm7b.env").read_text().splitlines()
    recipe = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    downloads = {shlex.split(line.lstrip("# "))[2]: shlex.split(line)[-1] for line in lines
                 if line.startswith("#   huggingface-cli download")}
    conversions = [config.parse_settings((convert_reward_head.Settings,), shlex.split(line.lstrip("# "))[2:])[0]
                   for line in lines if line.startswith("#   python examples/convert_reward_head.py")]
    assert {c.output_dir: c.checkpoint for c in conversions} == {
        recipe["REWARD"]: downloads["Nexusflow/Starling-RM-34B"],
        recipe["GOLD"]: downloads["OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"]}
