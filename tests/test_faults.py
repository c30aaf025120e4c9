"""Faults: bad input is refused in one line that names the file and the line or field, with exit
code 2 and nothing already written touched, or skipped with its count reported; a NaN or infinite
loss stops training before the update and keeps the last checkpoint; writes are atomic; the
defaults are safe (safetensors only, torch.load with weights_only, remote code only behind the flag).
RELIABILITY.md maps each promise to its test; kills at random points are in test_sigkill.py."""
from __future__ import annotations

import ast
import dataclasses
import fcntl
import fnmatch
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import ROOT, jsonl_text, make_tokenizer, pref_rows, save_model_dir, sentence
from safetensors.torch import load_file

from brevity import checkpoints, dist, files, fsdp, models, training
from brevity.config import UserError, run_main
import dpo
import evaluate
import label
import losses
import sample
import sft

STAGES = {"sft": (sft, (sft.Settings,)), "dpo": (dpo, dpo.settings_classes), "sample": (sample, (sample.Settings,)),
          "label": (label, (label.Settings,)), "evaluate": (evaluate, (evaluate.Settings,))}


def jsonl(rows: list[dict]) -> bytes:
    return jsonl_text(rows).encode()


def response(text: str) -> dict:
    return {"text": text, "num_tokens": len(text.split()) + 1, "finish_reason": "eos"}


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Well-formed inputs for every stage (4 rows each) and the scorers the stages call."""
    root = tmp_path_factory.mktemp("good")
    import random

    rng = random.Random(0)
    files = {
        "sft": [{"prompt": sentence(rng, 2, 8), "response": sentence(rng, 1, 6)} for _ in range(4)],
        "prefs": pref_rows(4),
        "prompts": [{"prompt": sentence(rng, 2, 8)} for _ in range(4)],
        "samples": [{"prompt": sentence(rng, 2, 8), "responses": [response("a b"), response("a b c d")]}
                    for _ in range(4)],
        "eval": [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in pref_rows(4, seed=1)],
    }
    paths = {"model": tiny_model_dir, "root": root}
    for name, rows in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_bytes(jsonl(rows))
    (root / "scorers.py").write_text(
        "def length(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
        "def constant(prompts, responses):\n    return [1.0 for _ in responses]\n"
        "def nan(prompts, responses):\n    return [float('nan') for _ in responses]\n"
        "def inf(prompts, responses):\n    return [float('inf') for _ in responses]\n"
        "def none(prompts, responses):\n    return None\n"
        "def one_float(prompts, responses):\n    return 1.0\n"
        "def strings(prompts, responses):\n    return [str(len(r)) for r in responses]\n"
        "def bools(prompts, responses):\n    return [len(r) > 3 for r in responses]\n"
        "calls = []\n"
        "def fails_late(prompts, responses):\n    calls.append(1)\n    if len(calls) == 2:\n"
        "        raise ValueError('no score for ' + responses[0])\n    return [float(len(r)) for r in responses]\n")
    paths["scorers"] = root / "scorers.py"
    return paths


def command(stage: str, g: dict, out: Path) -> dict[str, object]:
    """A stage's flags with good inputs, writing into `out`; None marks a flag without a value."""
    train = {"--batch_size": 2, "--max_steps": 1, "--activation_checkpointing": "false", "--resume": None}
    return {
        "sft": {"--model": g["model"], "--data": g["sft"], "--output_dir": out, **train},
        "dpo": {"--model": g["model"], "--data": g["prefs"], "--output_dir": out, **train},
        "sample": {"--model": g["model"], "--prompts": g["prompts"], "--output": out / "samples.jsonl", "--n": 2,
                   "--max_new_tokens": 4},
        "label": {"--samples": g["samples"], "--output_dir": out, "--reward_fn": f"{g['scorers']}:length"},
        "evaluate": {"--model": g["model"], "--sft_model": g["model"], "--prompts": g["eval"],
                     "--gold_fn": f"{g['scorers']}:length", "--output_dir": out, "--max_new_tokens": 4},
    }[stage]


def earlier_output(stage: str, out: Path) -> None:
    """What an earlier, interrupted run of the stage left in `out`: a bad rerun must not touch it."""
    files = {
        "sft": ["settings.json", "metrics.jsonl", "checkpoint-00000002/trainer_state.json"],
        "dpo": ["settings.json", "metrics.jsonl", "ref_logps.safetensors", "checkpoint-00000002/trainer_state.json"],
        "sample": ["samples.jsonl.parts/run_key.json", "samples.jsonl.parts/part-000000000.jsonl"],
        "label": ["pairs.jsonl"],
        "evaluate": ["details.jsonl", "generations.json"],
    }[stage]
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f'{{"earlier": "{name}"}}\n')


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# The corpus. A case makes a bad input from the good one (a file's bytes, or a directory) and names
# the flag it goes to. `expect` is a fragment of the one-line error ({bad} stands for the bad
# input's path); a case with `counted` instead is a documented skip: the run succeeds and
# `counted(out, stdout)` checks the count it reports.

DELETE = object()


def rows_with(name: str, row: int = 2, **fields) -> Callable[[dict], bytes]:
    """The good file `name` with row `row` (from 1) changed: a field set, or removed with DELETE."""
    def make(g):
        rows = [json.loads(line) for line in g[name].read_text().splitlines()]
        for field, value in fields.items():
            if value is DELETE:
                rows[row - 1].pop(field)
            else:
                rows[row - 1][field] = value
        return jsonl(rows)
    return make


def lines_with(name: str, line2: bytes) -> Callable[[dict], bytes]:
    """The good file `name` with its second line replaced by raw bytes."""
    def make(g):
        lines = g[name].read_bytes().splitlines(keepends=True)
        return b"".join(lines[:1] + [line2 + b"\n"] + lines[2:])
    return make


def truncated(name: str) -> Callable[[dict], bytes]:
    """The good file cut in the middle of its last line, as a copy that stopped half-way."""
    return lambda g: g[name].read_bytes()[:-12]


def empty(g) -> bytes:
    return b""


def model_without_weights(g, path: Path) -> None:
    shutil.copytree(g["model"], path)
    (path / "model.safetensors").unlink()


def model_with_only_pytorch_bin(g, path: Path) -> None:
    """A pickle checkpoint instead of safetensors: loading it could run code, so it is refused."""
    model_without_weights(g, path)
    torch.save(load_file(g["model"] / "model.safetensors"), path / "pytorch_model.bin")


def model_with_damaged_tokenizer(g, path: Path) -> None:
    """tokenizer.json valid JSON but missing its keys, as a half-written copy can leave it."""
    shutil.copytree(g["model"], path)
    (path / "tokenizer.json").write_text('{"model": {"type": "WordLevel"}}')


def model_with_added_tokens(g, path: Path) -> None:
    """Tokens added to the tokenizer, the embedding not resized: their ids are past its rows."""
    from transformers import AutoTokenizer

    shutil.copytree(g["model"], path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([f"new{i}" for i in range(16)])
    tokenizer.save_pretrained(path)


def config(text: bytes) -> Callable[[dict], bytes]:
    return lambda g: text


def all_pairs_identical(g) -> bytes:
    return jsonl([{**r, "rejected": r["chosen"]} for r in pref_rows(4)])


def long_prompt(name: str) -> Callable[[dict], bytes]:
    return rows_with(name, prompt=" ".join(["the quick brown fox"] * 40))


def count_in(file: str, key: str, value: int, printed: str) -> Callable[[Path, str], None]:
    def check(out: Path, stdout: str):
        assert json.loads((out / file).read_text())[key] == value
        assert printed in stdout
    return check


def says(*printed: str) -> Callable[[Path, str], None]:
    def check(out: Path, stdout: str):
        assert all(p in stdout for p in printed), stdout
    return check


def messages(*turns: str) -> list[dict]:
    """Chat messages from "role: content" strings."""
    return [{"role": role, "content": content} for role, _, content in (t.partition(": ") for t in turns)]


def model_with_config(**changes) -> Callable[[dict, Path], None]:
    """The good model's weights under a config.json with `changes` (None removes a key)."""
    def make(g, path: Path) -> None:
        shutil.copytree(g["model"], path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(changes)
        (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return make


def model_cut_short(g, path: Path) -> None:
    shutil.copytree(g["model"], path)
    cut(path / "model.safetensors")


def model_missing_a_shard(g, path: Path) -> None:
    shutil.copytree(g["model"], path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}))


def model_of_another_vocabulary(g, path: Path) -> None:
    save_model_dir(path, make_tokenizer(vocab_size=300))


def python_file(text: str) -> Callable[[dict], bytes]:
    return lambda g: text.encode()


def cut(path: Path) -> None:
    """A file cut in the middle, as a copy that stopped half-way."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def interrupted_run(stage: str, g: dict) -> Path:
    """A real sft.py or dpo.py run of 4 steps stopped just before its final save (made once): the
    checkpoints of steps 2 and 3 (the last two are kept), settings.json, metrics.jsonl, data_stats.json
    and, for dpo.py, the reference cache."""
    path = g["root"] / f"interrupted-{stage}"
    if not path.exists():
        module, classes = STAGES[stage]
        argv = as_argv({**command(stage, g, path), "--max_steps": 4, "--save_every": 1})
        with mock.patch.object(training.Run, "finish", side_effect=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
            run_main(module.main, classes, argv)
        checkpoints.unlock_output_dir(path)
    return path


def after_interrupted(stage: str, *damaged: str) -> Callable[[dict, Path], None]:
    """`out` as an interrupted run left it, with the files `damaged` (paths in it) cut short."""
    def earlier(g, out: Path) -> None:
        shutil.copytree(interrupted_run(stage, g), out)
        for name in damaged:
            cut(out / name)
    return earlier


HELD: list = []  # lock files held by "another process" in a case, released when it ends


def locked_by_another_run(g, out: Path) -> None:
    """The lock another run of sft.py took on output_dir, as checkpoints.lock_output_dir takes it."""
    earlier_output("sft", out)
    f = open(out.parent / f".{out.name}.lock", "w")
    f.write("sft.py (process 4242)")
    f.flush()
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD.append(f)


def sample_progress_of_other_prompts(g, out: Path) -> None:
    """sample.py's progress folder as a run on other prompts, with these very settings, left it."""
    s = sample.Settings(model=str(g["model"]), prompts="other.jsonl", output=str(out / "samples.jsonl"), n=2,
                        max_new_tokens=4)
    folder = sample.parts_dir(s.output)
    folder.mkdir(parents=True)
    (folder / "run_key.json").write_text(sample.run_key(s, ["another prompt"] * 4))
    (folder / "part-000000000.jsonl").write_text('{"index": 0, "responses": []}\n')


def sample_output_of_other_prompts(g, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "samples.jsonl").write_bytes(jsonl([{"prompt": f"other {i}", "responses": []} for i in range(4)]))


@dataclasses.dataclass
class Case:
    stage: str
    flag: str  # where the bad input goes
    make: Callable | None  # g -> bytes (a file), or (g, path) -> None (a directory); None: flags[flag] is it
    expect: str = ""  # a fragment of the one-line error ({bad}: the bad input, {made}: its file, {out}: output_dir)
    counted: Callable | None = None  # or: the run succeeds, and this checks the reported count
    flags: dict = dataclasses.field(default_factory=dict)  # other flags changed for the case ({bad}, {scorers})
    writes: tuple = ()  # files (fnmatch patterns) the failing run writes on purpose: statistics, kept scores
    earlier: Callable | None = None  # (g, out) -> None: what an earlier run left in out (default: earlier_output)

    @property
    def is_dir(self) -> bool:
        return self.make is not None and self.make.__code__.co_argcount == 2


CASES = {
    # sft.py --data: rows {prompt, response} or {messages}
    "sft-empty-file": Case("sft", "--data", empty, "{bad}: no rows (empty file)"),
    "sft-truncated-last-line": Case("sft", "--data", truncated("sft"), "{bad}:4: invalid JSON"),
    "sft-invalid-json": Case("sft", "--data", lines_with("sft", b"{'prompt': 'single quotes'}"),
                             "{bad}:2: invalid JSON"),
    "sft-missing-field": Case("sft", "--data", rows_with("sft", response=DELETE),
                              "{bad}: row 2: needs prompt and response"),
    "sft-wrong-type": Case("sft", "--data", rows_with("sft", response=7),
                           "{bad}: row 2: field 'response' has type int"),
    "sft-bad-chat-prompt": Case("sft", "--data", rows_with("sft", prompt=[1, 2]),
                                "{bad}: row 2: field 'prompt' is a list but not of chat messages"),
    "sft-empty-response": Case("sft", "--data", rows_with("sft", response=""),
                               "{bad}: row 2: field 'response' is empty"),
    "sft-not-utf8": Case("sft", "--data", lines_with("sft", b'{"prompt": "caf\xe9", "response": "a"}'),
                         "{bad}:2: not UTF-8"),
    "sft-prompt-too-long": Case("sft", "--data", long_prompt("sft"), flags={"--max_prompt_length": 64},
                                counted=count_in("data_stats.json", "prompts_cut", 1, "1 prompts cut from the left")),
    "sft-model-without-weights": Case("sft", "--model", model_without_weights, "{bad}: no *.safetensors weights"),
    "sft-tokenizer-past-the-embedding": Case("sft", "--model", model_with_added_tokens,
                                             "{bad}: its tokenizer has"),
    "sft-config-unknown-key": Case("sft", "--config", config(b"lr: 1.0e-4\nbogus: 1\n"), "{bad}: unknown key 'bogus'"),
    "sft-config-wrong-type": Case("sft", "--config", config(b"lr: fast\n"), "{bad}: key 'lr' should be"),
    # dpo.py --data: pairs {prompt, chosen, rejected}
    "dpo-empty-file": Case("dpo", "--data", empty, "{bad}: no rows (empty file)"),
    "dpo-truncated-last-line": Case("dpo", "--data", truncated("prefs"), "{bad}:4: invalid JSON"),
    "dpo-invalid-json": Case("dpo", "--data", lines_with("prefs", b'{"prompt": "a", "chosen": }'),
                             "{bad}:2: invalid JSON"),
    "dpo-missing-field": Case("dpo", "--data", rows_with("prefs", rejected=DELETE),
                              "{bad}:2: missing field 'rejected'"),
    "dpo-wrong-type": Case("dpo", "--data", rows_with("prefs", chosen=3.5), "{bad}:2: field 'chosen' has type float"),
    "dpo-bad-chat-response": Case("dpo", "--data", rows_with("prefs", chosen=[{"role": "assistant"}]),
                                  "{bad}:2: field 'chosen' is a list but not of chat messages"),
    "dpo-empty-response": Case("dpo", "--data", rows_with("prefs", chosen=""), "{bad}:2: field 'chosen' is empty"),
    "dpo-not-utf8": Case("dpo", "--data", lines_with("prefs", b'{"prompt": "\xff\xfe"}'), "{bad}:2: not UTF-8"),
    "dpo-prompt-too-long": Case("dpo", "--data", long_prompt("prefs"), flags={"--max_prompt_length": 64},
                                counted=count_in("data_stats.json", "prompts_cut", 1, "1 prompts cut from the left")),
    "dpo-chosen-identical-to-rejected": Case(
        "dpo", "--data", rows_with("prefs", chosen="the same", rejected="the same"),
        counted=count_in("data_stats.json", "dropped_identical", 1, "1 pairs dropped (chosen identical to rejected)")),
    "dpo-every-pair-identical": Case("dpo", "--data", all_pairs_identical, "{bad}: 0 usable examples"),
    "dpo-model-only-pytorch-bin": Case("dpo", "--model", model_with_only_pytorch_bin,
                                       "{bad}: no *.safetensors weights (only safetensors are loaded)"),
    "dpo-model-damaged-tokenizer": Case("dpo", "--model", model_with_damaged_tokenizer,
                                       "{bad}: cannot load tokenizer (KeyError"),
    "dpo-ref-model-without-weights": Case("dpo", "--ref_model", model_without_weights, "{bad}: no *.safetensors"),
    "dpo-config-unknown-key": Case("dpo", "--config", config(b"bogus: 1\n"), "{bad}: unknown key 'bogus'"),
    # sample.py --prompts: rows {prompt}
    "sample-empty-file": Case("sample", "--prompts", empty, "{bad}: no rows (empty file)"),
    "sample-truncated-last-line": Case("sample", "--prompts", truncated("prompts"), "{bad}:4: invalid JSON"),
    "sample-missing-field": Case("sample", "--prompts", rows_with("prompts", prompt=DELETE),
                                 "{bad}:2: missing field 'prompt'"),
    "sample-wrong-type": Case("sample", "--prompts", rows_with("prompts", prompt={"text": "x"}),
                              "{bad}:2: field 'prompt' has type dict"),
    "sample-empty-prompt": Case("sample", "--prompts", rows_with("prompts", prompt=""),
                                "{bad}:2: field 'prompt' is empty"),
    "sample-not-utf8": Case("sample", "--prompts", lines_with("prompts", b'{"prompt": "\xc3"}'), "{bad}:2: not UTF-8"),
    "sample-model-only-pytorch-bin": Case("sample", "--model", model_with_only_pytorch_bin,
                                          "{bad}: no *.safetensors weights"),
    "sample-tokenizer-past-the-embedding": Case("sample", "--model", model_with_added_tokens,  # a fresh run: one
                                                "{bad}: its tokenizer has",  # of another model is refused first
                                                earlier=lambda g, out: None),
    "sample-config-unknown-key": Case("sample", "--config", config(b"temperature: 0.7\nbogus: 1\n"),
                                      "{bad}: unknown key 'bogus'"),
    # label.py --samples: rows {prompt, responses: [{text, num_tokens, finish_reason}]}
    "label-empty-file": Case("label", "--samples", empty, "{bad}: no rows (empty file)"),
    "label-truncated-last-line": Case("label", "--samples", truncated("samples"), "{bad}:4: invalid JSON"),
    "label-missing-field": Case("label", "--samples", rows_with("samples", responses=DELETE),
                                "{bad}:2: missing field 'responses'"),
    "label-wrong-type": Case("label", "--samples", rows_with("samples", responses="a b"),
                             "{bad}:2: field 'responses' has type str"),
    "label-nan-in-a-response": Case("label", "--samples", lines_with(
        "samples", b'{"prompt": "x", "responses": [{"text": "a", "num_tokens": NaN, "finish_reason": "eos"}]}'),
        "{bad}: row 2: response 1 needs text (string), num_tokens (integer)"),
    "label-empty-response": Case("label", "--samples", rows_with("samples", responses=[
        response(""), response("a b"), response("a b c")]),
        counted=count_in("label_stats.json", "dropped_empty", 1, "4 pairs of 4 prompts")),
    "label-not-utf8": Case("label", "--samples", lines_with("samples", b'{"prompt": "\x80"}'), "{bad}:2: not UTF-8"),
    "label-nan-scores": Case("label", "--reward_fn", None, "row 1: response 1 got score nan",
                             flags={"--reward_fn": "{scorers}:nan"}),
    "label-infinite-scores": Case("label", "--reward_fn", None, "row 1: response 1 got score inf",
                                  flags={"--reward_fn": "{scorers}:inf"}),
    "label-every-pair-ties": Case("label", "--reward_fn", None, "no pair survived (4 ties",
                                  flags={"--reward_fn": "{scorers}:constant"},
                                  writes=("scores.jsonl", "label_stats.json", "label_settings.json",
                                          "scores.jsonl.parts/*")),
    "label-reward-model-only-pytorch-bin": Case("label", "--reward_model", model_with_only_pytorch_bin,
                                                "{bad}: no *.safetensors weights", flags={"--reward_fn": DELETE}),
    "label-config-unknown-key": Case("label", "--config", config(b"bogus: 1\n"), "{bad}: unknown key 'bogus'"),
    # evaluate.py --prompts: rows {prompt, chosen}; --sft_generations: evaluate.py's own earlier output
    "evaluate-empty-file": Case("evaluate", "--prompts", empty, "{bad}: no rows (empty file)"),
    "evaluate-truncated-last-line": Case("evaluate", "--prompts", truncated("eval"), "{bad}:4: invalid JSON"),
    "evaluate-missing-field": Case("evaluate", "--prompts", rows_with("eval", chosen=DELETE),
                                   "{bad}:2: missing field 'chosen'"),
    "evaluate-wrong-type": Case("evaluate", "--prompts", rows_with("eval", prompt=12),
                                "{bad}:2: field 'prompt' has type int"),
    "evaluate-empty-reference": Case("evaluate", "--prompts", rows_with("eval", chosen=""),
                                     "{bad}:2: field 'chosen' is empty"),
    "evaluate-not-utf8": Case("evaluate", "--prompts", lines_with("eval", b'{"prompt": "\xe9t\xe9"}'),
                              "{bad}:2: not UTF-8"),
    "evaluate-bad-sft-generations": Case("evaluate", "--sft_generations",
                                         config(b'{"prompt": "a", "output": "b", "nu\n'), "{bad}:1: invalid JSON"),
    "evaluate-nan-gold-scores": Case("evaluate", "--gold_fn", None,
                                     "gold scorer returned nan for the policy response to prompt 0",
                                     flags={"--gold_fn": "{scorers}:nan"}, writes=("responses.rank0.json",)),
    "evaluate-model-only-pytorch-bin": Case("evaluate", "--model", model_with_only_pytorch_bin,
                                            "{bad}: no *.safetensors weights"),
    "evaluate-sft-model-without-weights": Case("evaluate", "--sft_model", model_without_weights,
                                               "{bad}: no *.safetensors weights"),
    "evaluate-config-unknown-key": Case("evaluate", "--config", config(b"bogus: 1\n"), "{bad}: unknown key 'bogus'"),

    # Issue 14, inputs nobody here wrote. 1: JSON rows and YAML configs past what json and yaml take for granted.
    "sft-an-integer-of-5000-digits": Case("sft", "--data", lines_with(
        "sft", b'{"prompt": "a", "response": "b", "id": 1' + b"0" * 5000 + b"}"),
        "{bad}:2: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion)"),
    "dpo-arrays-nested-100000-deep": Case("dpo", "--data", lines_with(
        "prefs", b'{"prompt": "a", "chosen": "b", "rejected": "c", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "{bad}:2: invalid JSON (nested too deeply)"),
    "sample-a-lone-surrogate": Case("sample", "--prompts", lines_with("prompts", b'{"prompt": "caf\\ud800"}'),
                                    "{bad}:2: a string holds a lone surrogate escape"),
    "label-a-key-given-twice": Case("label", "--samples", lines_with(
        "samples", b'{"prompt": "x", "responses": [], "prompt": "y"}'), "{bad}:2: key 'prompt' given twice"),
    "evaluate-a-key-given-twice-in-a-message": Case("evaluate", "--prompts", lines_with(
        "eval", b'{"prompt": [{"role": "user", "content": "a", "role": "system"}], "chosen": "b"}'),
        "{bad}:2: key 'role' given twice"),
    "sft-config-key-given-twice": Case("sft", "--config", config(b"lr: 1.0e-4\nbatch_size: 2\nlr: 2.0e-4\n"),
                                       "{bad}:3: not valid YAML: key 'lr' given twice (first on line 1)"),
    "dpo-config-nested-100000-deep": Case("dpo", "--config", config(b"beta: " + b"[" * 100_000),
                                          "{bad}: not valid YAML: nested too deeply"),
    "label-config-an-integer-of-5000-digits": Case("label", "--config", config(b"batch_size: 1" + b"0" * 5000),
                                                   "{bad}: not valid YAML: Exceeds the limit (4300 digits)"),
    "sample-config-a-lone-surrogate": Case("sample", "--config", config(b'model: "m\\ud800"\n'),
                                           "{bad}: a string holds a lone surrogate escape"),
    # 2: chat messages: files.PROMPT and files.RESPONSE, checked where rows are read.
    "sft-unknown-role": Case("sft", "--data", rows_with("sft", prompt=messages("bot: hi")),
                             "{bad}: row 2: field 'prompt' message 1 has role 'bot'"),
    "dpo-prompt-ends-with-the-assistant": Case("dpo", "--data", rows_with(
        "prefs", prompt=messages("user: a", "assistant: b")), "{bad}:2: field 'prompt' ends with an assistant turn"),
    "dpo-chosen-ends-with-the-user": Case("dpo", "--data", rows_with(
        "prefs", chosen=messages("user: a", "assistant: b", "user: c")),
        "{bad}:2: field 'chosen' ends with a user turn"),
    "dpo-rejected-without-text": Case("dpo", "--data", rows_with("prefs", rejected=messages("assistant: ")),
                                      "{bad}:2: field 'rejected' message 1 (assistant) has no text"),
    "sft-whitespace-only-response": Case("sft", "--data", rows_with("sft", response=" \n "),
                                         "{bad}: row 2: field 'response' is blank (whitespace only)"),
    "sft-messages-and-prompt-response": Case("sft", "--data", rows_with(
        "sft", messages=messages("user: a", "assistant: b")), "{bad}: row 2: has messages and also prompt or response"),
    "sft-messages-out-of-order": Case("sft", "--data", rows_with(
        "sft", prompt=DELETE, response=DELETE, messages=messages("user: a", "user: b", "assistant: c")),
        "{bad}: row 2: field 'messages' message 2 is a user turn where an assistant turn belongs"),
    "sample-system-only-prompt": Case("sample", "--prompts", rows_with("prompts", prompt=messages("system: be brief")),
                                      "{bad}:2: field 'prompt' has no user turn"),
    "label-prompt-ends-with-the-assistant": Case("label", "--samples", rows_with(
        "samples", prompt=messages("user: a", "assistant: b")), "{bad}:2: field 'prompt' ends with an assistant turn"),
    "evaluate-blank-reference": Case("evaluate", "--prompts", rows_with("eval", chosen="   "),
                                     "{bad}:2: field 'chosen' is blank"),
    "label-whitespace-only-response": Case("label", "--samples", rows_with("samples", responses=[
        response(" "), response("a b"), response("a b c")]),
        counted=count_in("label_stats.json", "dropped_empty", 1, "4 pairs of 4 prompts")),
    # 3: settings: every float finite (NaN passes every `<`), ranges before anything is written.
    "sample-temperature-nan": Case("sample", "--temperature", None, "--temperature nan: not a finite number",
                                   flags={"--temperature": "nan"}),
    "label-min-margin-nan": Case("label", "--min_margin", None, "--min_margin nan: not a finite number",
                                 flags={"--min_margin": "nan"}),
    "dpo-beta-nan": Case("dpo", "--beta", None, "--beta nan: not a finite number", flags={"--beta": "nan"}),
    "dpo-beta-negative": Case("dpo", "--beta", None, "--loss ilrdpo: beta must be > 0, got -1.0",
                              flags={"--beta": "-1"}),
    "dpo-alpha-negative": Case("dpo", "--alpha", None, "--loss ilrdpo: alpha must be >= 0", flags={"--alpha": "-1"}),
    "sft-chunk-size-0": Case("sft", "--chunk_size", None, "--chunk_size 0: need >= 1", flags={"--chunk_size": "0"}),
    "dpo-save-every-negative": Case("dpo", "--save_every", None, "--save_every -2: need >= 0",
                                    flags={"--save_every": "-2"}),
    "evaluate-gold-batch-size-0": Case("evaluate", "--gold_batch_size", None, "--gold_batch_size must be >= 1",
                                       flags={"--gold_batch_size": "0"}),
    "label-config-min-margin-infinite": Case("label", "--config", config(b"min_margin: .inf\n"),
                                     "--min_margin inf: not a finite number"),
    # 4: outputs, checked before any work.
    "sft-output-dir-is-a-file": Case("sft", "--output_dir", empty,
                                     "--output_dir {bad}: is a file; expected a directory"),
    "dpo-output-dir-is-the-working-directory": Case("dpo", "--output_dir", None, "--output_dir .: is the working "
                                                    "directory or holds it", flags={"--output_dir": "."}),
    "dpo-output-dir-holds-the-data": Case("dpo", "--output_dir", lambda g, path: (path.mkdir(), shutil.copy(
        g["prefs"], path / "prefs.jsonl")), "--output_dir {bad}: holds --data", flags={"--data": "{bad}/prefs.jsonl"}),
    "sft-output-dir-holds-other-files": Case("sft", "--output_dir", lambda g, path: (path.mkdir(), (
        path / "notes.txt").write_text("mine")), "--output_dir {bad}: holds 'notes.txt', not of a sft.py run"),
    "sample-output-is-a-directory": Case("sample", "--output", lambda g, path: path.mkdir(),
                                         "--output {bad}: is a directory; expected a file name"),
    "label-output-dir-is-a-file": Case("label", "--output_dir", empty, "--output_dir {bad}: is a file"),
    "evaluate-output-dir-inside-a-file": Case("evaluate", "--output_dir", empty, "--output_dir {made}/eval: {made} is "
                                              "a file, not a directory", flags={"--output_dir": "{bad}/eval"}),
    "evaluate-sft-generations-is-a-directory": Case("evaluate", "--sft_generations", lambda g, path: path.mkdir(),
                                                    "--sft_generations {bad}: is a directory"),
    # 5: models: weights that do not fit their config are refused, not randomly filled in.
    "sft-model-config-of-another-architecture": Case("sft", "--model", model_with_config(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=32, n_layer=2, n_head=4, hidden_size=None,
        num_hidden_layers=None), "{bad}: the weights do not fit the GPT2LMHeadModel its config.json describes"),
    "dpo-model-config-with-more-layers": Case("dpo", "--model", model_with_config(num_hidden_layers=4),
                                              "{bad}: the weights do not fit the LlamaForCausalLM its config.json "
                                              "describes (18 missing"),
    "sample-model-of-other-shapes": Case("sample", "--model", model_with_config(intermediate_size=48),
                                         "{bad}: weights of other shapes than its config.json describes",
                                         earlier=lambda g, out: None),
    "evaluate-model-weights-cut-short": Case("evaluate", "--model", model_cut_short,
                                             "{bad}: model.safetensors: 58684 bytes, but its header needs 117368"),
    "sft-model-missing-a-shard": Case("sft", "--model", model_missing_a_shard, "{bad}: model.safetensors.index.json "
                                      "names model-00002-of-00002.safetensors, which is missing"),
    "dpo-ref-model-of-another-vocabulary": Case("dpo", "--ref_model", model_of_another_vocabulary,
                                                "--ref_model {bad}: another vocabulary than"),
    "evaluate-sft-model-of-another-vocabulary": Case("evaluate", "--sft_model", model_of_another_vocabulary,
                                                     "--sft_model {bad}: another vocabulary than"),
    "label-reward-model-without-a-score-head": Case("label", "--reward_model", lambda g, path: shutil.copytree(
        g["model"], path), "{bad}: the weights do not fit the LlamaForSequenceClassification its config.json describes "
                           "(1 missing, e.g. score.weight", flags={"--reward_fn": DELETE}),
    # 6: reward and gold functions: their scores, their import, their exceptions.
    "label-reward-returns-none": Case("label", "--reward_fn", None, "--reward_fn {bad}: returned NoneType None, not a "
                                      "list of 8 scores", flags={"--reward_fn": "{scorers}:none"}),
    "label-reward-returns-one-float": Case("label", "--reward_fn", None, "--reward_fn {bad}: returned float 1.0",
                                           flags={"--reward_fn": "{scorers}:one_float"}),
    "label-reward-returns-numeric-strings": Case("label", "--reward_fn", None,
                                                 "--reward_fn {bad}: score 1 of a batch is '7' (str), not a number",
                                                 flags={"--reward_fn": "{scorers}:strings"}),
    "evaluate-gold-returns-bools": Case("evaluate", "--gold_fn", None, "(bool), not a number",
                                        flags={"--gold_fn": "{scorers}:bools"}, writes=("responses.rank0.json",)),
    "label-reward-file-with-a-syntax-error": Case("label", "--reward_fn", python_file("def score(p, r:\n"),
                                                  "--reward_fn '{bad}': ", flags={"--reward_fn": "{bad}:score"}),
    "evaluate-gold-file-raising-on-import": Case("evaluate", "--gold_fn", python_file(
        "import os\nKEY = os.environ['NO_SUCH_KEY_HERE']\n"), "': importing ", flags={"--gold_fn": "{bad}:score"}),
    "label-reward-raises-in-batch-2": Case(
        "label", "--reward_fn", None, "--reward_fn {bad} raised ValueError: no score for a b; in batch 2 of 2, "
        "responses 5-8; the scores before it are kept in {out}/scores.jsonl.parts for the next run",
        flags={"--reward_fn": "{scorers}:fails_late", "--batch_size": 4},
        writes=("scores.jsonl.parts/*",)),
    # 7: resume and concurrency.
    "dpo-resume-past-max-steps": Case("dpo", "--max_steps", None,
                                      "{out}/checkpoint-00000003: at step 3, past this run's 2 steps",
                                      flags={"--max_steps": "2"}, earlier=after_interrupted("dpo")),
    "dpo-resume-after-the-data-changed": Case(
        "dpo", "--data", rows_with("prefs", chosen="another answer"),
        "{bad}: its rows changed since {out}/checkpoint-00000003 was trained on them", flags={"--max_steps": 4},
        earlier=after_interrupted("dpo")),
    "sft-resume-every-checkpoint-damaged": Case(
        "sft", "--max_steps", None, "{out}: checkpoint-00000003 is damaged (__0_0.distcp has",
        flags={"--max_steps": "4"},
        earlier=after_interrupted("sft", "checkpoint-00000003/__0_0.distcp", "checkpoint-00000002/trainer_state.json")),
    "dpo-resume-the-last-checkpoint-damaged": Case(
        "dpo", "--max_steps", None, flags={"--max_steps": "4"},
        earlier=after_interrupted("dpo", "checkpoint-00000003/__0_0.distcp"),
        counted=says("note: checkpoint-00000003 is damaged (__0_0.distcp has", "resuming from checkpoint-00000002 "
                     "instead", "checkpoint-00000002 (step 2 of 4)")),
    "dpo-resume-with-the-reference-cache-cut-short": Case(
        "dpo", "--max_steps", None, flags={"--max_steps": "4"},
        earlier=after_interrupted("dpo", "ref_logps.safetensors"), counted=says("reference log-probs of 4 pairs in")),
    "sft-output-dir-locked-by-another-run": Case("sft", "--max_steps", None,
                                                 "--output_dir {out}: sft.py (process 4242) is writing into it",
                                                 flags={"--max_steps": "1"},
                                                 earlier=locked_by_another_run),
    "sample-progress-of-other-prompts": Case("sample", "--prompts", lambda g: g["prompts"].read_bytes(),
                                             "samples.jsonl.parts: progress of a run with other settings (prompts)",
                                             earlier=sample_progress_of_other_prompts),
    "sample-complete-output-of-other-prompts": Case("sample", "--prompts", lambda g: g["prompts"].read_bytes(),
                                                    "samples.jsonl: holds samples of other prompts",
                                                    earlier=sample_output_of_other_prompts),
}


def as_argv(flags: dict) -> list[str]:
    return [str(x) for flag, value in flags.items() for x in ([flag] if value is None else [flag, value])]


def argv_for(case: Case, g: dict, out: Path, bad) -> list[str]:
    flags = {**command(case.stage, g, out), case.flag: bad}
    for flag, value in case.flags.items():
        if flag == case.flag:  # the bad input itself, made above
            continue
        if value is DELETE:
            flags.pop(flag)
        else:
            flags[flag] = value.format(scorers=g["scorers"], bad=bad) if isinstance(value, str) else value
    return as_argv(flags)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_file_and_line_or_a_counted_skip(name, good, tmp_path, capsys):
    case = CASES[name]
    suffix = {"--config": ".yaml", "--reward_fn": ".py", "--gold_fn": ".py"}.get(case.flag, ".jsonl")
    bad = tmp_path / ("bad model" if case.is_dir else f"bad{suffix}")
    if case.is_dir:
        case.make(good, bad)
    elif case.make:
        bad.write_bytes(case.make(good))
    out, made = tmp_path / "out", bad
    if case.make is None or case.flag in case.flags:  # the bad thing is the flag's value (naming `bad`, maybe)
        bad = case.flags[case.flag].format(scorers=good["scorers"], bad=bad)
    module, classes = STAGES[case.stage]
    (case.earlier or (lambda g, o: None if case.counted else earlier_output(case.stage, o)))(good, out)
    capsys.readouterr()  # what making the earlier output printed
    try:
        if case.counted:
            run_main(module.main, classes, argv_for(case, good, out, bad))
            case.counted(out, capsys.readouterr().out)
            return
        before = snapshot(out) if out.is_dir() else {}
        with pytest.raises(SystemExit) as exit_:
            run_main(module.main, classes, argv_for(case, good, out, bad))
    finally:
        while HELD:
            HELD.pop().close()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert case.expect.format(bad=bad, made=made, out=out) in err, err
    after = snapshot(out) if out.is_dir() else {}
    assert {k: after.get(k) for k in before} == before  # nothing already written is touched
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in case.writes) for name in set(after) - set(before))


def test_the_real_command_prints_the_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "samples.jsonl"
    bad.write_bytes(jsonl([{"prompt": "x", "responses": [response("a")]}]) + b'{"prompt": "\xff"}\n')
    result = subprocess.run([sys.executable, "label.py", "--samples", str(bad), "--reward_fn", "embedded:proxy_reward"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {bad}:2: not UTF-8 (invalid start byte at byte 12)\n"


# Beyond one bad file: run_iterative.sh recipes, kept scores, kept checkpoints, two runs on
# one output directory, file modes.

RECIPES = {  # recipe text, environment, the one-line error ({recipe}: the recipe's path)
    "a-key-with-a-space": ("NAME=a\nNPROC K=1\n", {}, "{recipe}:2: 'NPROC K' is not a key (letters, digits and _)"),
    "a-key-given-twice": ("K=1\nLOSS=dpo\nK=2\n", {}, "{recipe}:3: K given twice (first on line 1)"),
    "an-unclosed-quote": ('NAME="run#2\n', {}, '{recipe}:1: NAME: no closing "'),
    "text-after-the-closing-quote": ("NAME='run 2' x\n", {}, "{recipe}:1: NAME: text after the closing quote: x"),
    "nproc-0": ("", {"NPROC": "0"}, "NPROC=0: need at least one process"),
    "one-response-per-prompt": ("N=1\n", {}, "N=1: need at least two responses per prompt to make a pair"),
    "a-seed-with-a-leading-zero": ("SEED=010\n", {}, "SEED=010: need a whole number (digits, no leading 0)"),
}


def run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "run_iterative.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "TQDM_DISABLE": "1", **env},
                          timeout=300)


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_bad_recipe_is_refused_in_one_line(name, tmp_path):
    text, env, message = RECIPES[name]
    recipe = tmp_path / "my recipe.env"
    recipe.write_text(text)
    result = run_script(tmp_path, str(recipe), DRY_RUN="1", **env)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr == f"error: {message.format(recipe=recipe)}\n"
    assert not (tmp_path / "runs").exists()


def test_a_recipe_value_is_read_as_written(tmp_path):
    """A '#' inside quotes is part of the value; a ' #' outside them starts a comment."""
    recipe = tmp_path / "recipe.env"
    recipe.write_text('NAME="run#2"   # the second run\nLOSS_ARGS=\'--beta 0.2\'\nK=1 # one iteration\n'
                      "TEMPERATURE=0.7#not-a-comment\n")
    result = run_script(tmp_path, str(recipe), DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path}/runs/run#2/iter1/samples.jsonl" in result.stdout and "iter2" not in result.stdout
    assert "--beta 0.2" in result.stdout and "--temperature 0.7#not-a-comment" in result.stdout


def test_a_run_resumed_with_another_loss_is_refused(good, tmp_path):
    """Iteration 1 records its settings when it starts (here it stops at once: no prompts file); a
    rerun with another LOSS is refused before any stage runs, naming what changed."""
    env = {"K": "1", "NAME": "r", "BASE_MODEL": str(good["model"]), "SFT_DATA": "",
           "PROMPTS": str(tmp_path / "missing.jsonl"), "EVAL_PROMPTS": str(good["eval"]),
           "REWARD": "embedded:proxy_reward", "GOLD": "embedded:gold_score"}
    first = run_script(tmp_path, LOSS="dpo", **env)
    assert first.returncode == 2 and "missing.jsonl: file not found" in first.stderr, first.stderr
    record = tmp_path / "runs" / "r" / "iter1" / "loop_settings.env"
    assert "LOSS=dpo\n" in record.read_text()
    again = run_script(tmp_path, LOSS="ilrdpo", **env)
    assert again.returncode == 2 and again.stdout == ""
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {record}: made with other settings (LOSS=dpo, now ilrdpo; LOSS_ARGS='', now "
                      "--alpha\\ 0.4); rerun with those, or use another NAME"]


def test_scores_before_a_failing_batch_are_kept_and_not_asked_for_again(good, tmp_path, monkeypatch, capsys):
    scorer = tmp_path / "flaky.py"
    scorer.write_text(f"import os\ncalls = []\ndef score(prompts, responses):\n"
                      f"    open({str(tmp_path / 'asked')!r}, 'a').write(f'{{len(responses)}}\\n')\n"
                      f"    calls.append(1)\n"
                      f"    if os.environ.get('BREAK_IN_CALL') == str(len(calls)):\n"
                      f"        raise ValueError('broken')\n"
                      f"    return [float(len(r.split())) for r in responses]\n")
    argv = ["--samples", str(good["samples"]), "--reward_fn", f"{scorer}:score", "--batch_size", "3"]
    run_main(label.main, (label.Settings,), [*argv, "--output_dir", str(tmp_path / "whole")])
    (tmp_path / "asked").unlink()
    monkeypatch.setenv("BREAK_IN_CALL", "2")
    err = one_line_error(capsys, label, (label.Settings,), [*argv, "--output_dir", str(tmp_path / "out")])
    assert "raised ValueError: broken; in batch 2 of 3, responses 4-6; the scores before it are kept in" in err
    monkeypatch.delenv("BREAK_IN_CALL")
    run_main(label.main, (label.Settings,), [*argv, "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "asked").read_text().split() == ["3", "3", "3", "2"]  # 3 of 8 kept: 5 asked again
    for name in ("scores.jsonl", "pairs.jsonl", "label_stats.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not (tmp_path / "out" / "scores.jsonl.parts").exists()


def test_a_damaged_last_checkpoint_resumes_from_the_one_before_to_the_same_weights(good, tmp_path, capsys):
    """The last two whole checkpoints are kept: with the newest cut short, the resume starts from the
    one before and ends with the weights of a run never interrupted."""
    interrupted = interrupted_run("dpo", good)
    assert sorted(p.name for p in interrupted.glob("*checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000003"]
    flags = {**command("dpo", good, tmp_path / "whole"), "--max_steps": 4, "--save_every": 1}
    run_main(dpo.main, dpo.settings_classes, as_argv(flags))
    out = tmp_path / "out"
    after_interrupted("dpo", "checkpoint-00000003/__0_0.distcp")(good, out)
    capsys.readouterr()
    run_main(dpo.main, dpo.settings_classes, as_argv({**flags, "--output_dir": out}))
    assert "resuming from checkpoint-00000002 instead" in capsys.readouterr().out
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_into_one_output_dir_refuses_and_the_first_ends_whole(good, tmp_path):
    """The second process is started first and waits, imported, for its cue: it asks for the lock
    while the first is training, whatever the machine's speed."""
    out = tmp_path / "out"
    argv = as_argv({**command("dpo", good, out), "--max_steps": 200, "--save_every": 50})
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    second = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import dpo; "
                               "from brevity.config import run_main; from transformers import HfArgumentParser; "
                               "print('ready', flush=True); sys.stdin.readline(); "
                               f"run_main(dpo.main, dpo.settings_classes, {argv!r})"],
                              cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert second.stdout.readline() == "ready\n"
    first = subprocess.Popen([sys.executable, "dpo.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):  # the first is training
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    _, err = second.communicate("go\n", timeout=120)
    assert second.returncode == 2, err
    assert err == (f"error: --output_dir {out}: dpo.py (process {first.pid}) is writing into it; wait for it to end, "
                   "or choose another --output_dir\n")
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 201)) and (out / "model.safetensors").is_file()
    assert not (tmp_path / ".out.lock").exists()  # the first run released it


@pytest.mark.parametrize("stage", ["dpo", "sample", "label", "evaluate"])
def test_files_get_the_mode_of_the_umask(stage, good, tmp_path):
    """Under umask 027 every file a stage writes is 0640 and every directory 0750 (mkstemp would give
    0600, mkdtemp and safetensors 0700 and 0600)."""
    module, classes = STAGES[stage]
    out = tmp_path / "out"
    before = os.umask(0o027)
    try:
        run_main(module.main, classes, as_argv(command(stage, good, out)))
    finally:
        os.umask(before)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes and all(mode == (0o750 if (out / name).is_dir() else 0o640) for name, mode in modes.items()), modes


# A NaN or infinite loss stops training before the update; the last checkpoint stays whole.

def train_flags(model, data, out, *extra) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--output_dir", str(out), "--batch_size", "8",
            "--max_steps", "6", "--save_every", "2", "--lr", "1e-3", "--warmup_steps", "0", "--lr_schedule",
            "constant", "--activation_checkpointing", "false", *extra]


def one_line_error(capsys, module, classes, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_main(module.main, classes, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    return err


def test_a_nan_loss_stops_dpo_before_the_update_and_its_checkpoint_resumes_as_if_nothing_happened(
        tiny_model_dir, tiny_prefs_jsonl, tmp_path, monkeypatch, capsys):
    never = train_flags(tiny_model_dir, tiny_prefs_jsonl, tmp_path / "never", "--loss", "dpo")
    run_main(dpo.main, dpo.settings_classes, never)
    real, calls = losses.LOSSES["dpo"], []

    @functools.wraps(real.fn)  # the same signature: the same hyperparameter flags
    def nan_in_step_5(**kwargs):
        if len(kwargs["policy_chosen_logps"]) == 1:  # losses.Objective's check of the hyperparameters: not a step
            return real.fn(**kwargs)
        calls.append(1)
        pair_losses, chosen, rejected = real.fn(**kwargs)
        return pair_losses * (float("nan") if len(calls) == 5 else 1.0), chosen, rejected

    monkeypatch.setitem(losses.LOSSES, "dpo", losses.Loss(nan_in_step_5, reference_free=False))
    out = tmp_path / "out"
    flags = train_flags(tiny_model_dir, tiny_prefs_jsonl, out, "--loss", "dpo", "--resume")
    err = one_line_error(capsys, dpo, dpo.settings_classes, flags)
    assert err == (f"error: dpo.py: step 5: loss is nan; stopping. The last good checkpoint (step 4) is in "
                   f"{out}/checkpoint-00000004; resume from it with --resume and a lower --lr, or check the data\n")
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000004"]
    assert not (out / "model.safetensors").exists()

    monkeypatch.setitem(losses.LOSSES, "dpo", real)
    run_main(dpo.main, dpo.settings_classes, flags)
    assert "(step 4 of 6)" in capsys.readouterr().out
    a, b = load_file(tmp_path / "never" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_infinite_loss_stops_sft_and_keeps_its_last_checkpoint_loadable(tiny_model_dir, tiny_sft_jsonl, tmp_path,
                                                                          monkeypatch, capsys):
    real, calls = sft.accumulate_gradients, []

    def inf_in_step_3(*args):
        calls.append(1)
        sums = real(*args)
        return {**sums, "nll": sums["nll"] * float("inf")} if len(calls) == 3 else sums

    monkeypatch.setattr(sft, "accumulate_gradients", inf_in_step_3)
    out = tmp_path / "out"
    err = one_line_error(capsys, sft, (sft.Settings,), train_flags(tiny_model_dir, tiny_sft_jsonl, out))
    assert err.startswith("error: sft.py: step 3: loss is inf; stopping. The last good checkpoint (step 2) is in")
    checkpoint = out / "checkpoint-00000002"
    assert [p.name for p in out.glob("*checkpoint-*")] == [checkpoint.name] and not (out / "config.json").exists()
    policy = fsdp.wrap_policy(models.load_model(str(tiny_model_dir)), dist.Dist())
    optimizer = torch.optim.AdamW(policy.parameters())
    assert checkpoints.load_checkpoint(checkpoint, policy, optimizer, dist.Dist())["step"] == 2
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_a_learning_rate_that_blows_up_the_weights_stops_sft_with_a_clear_message(tiny_model_dir, tiny_sft_jsonl,
                                                                                 tmp_path, capsys):
    out = tmp_path / "out"
    err = one_line_error(capsys, sft, (sft.Settings,), train_flags(tiny_model_dir, tiny_sft_jsonl, out, "--lr", "1e10"))
    assert re.fullmatch(r"error: sft\.py: step \d+: (loss|gradient norm) is (nan|inf); stopping\. .*lower --lr.*\n",
                        err), err
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("kill, left", [("mid-write", "old"), ("before-rename", "old"), ("after-rename", "new")])
def test_a_kill_inside_a_write_leaves_the_old_file_or_the_new_one_never_a_part(kill, left, tmp_path):
    path = tmp_path / "pairs.jsonl"
    texts = {"old": '{"old": 1}\n' * 1000, "new": '{"new": 2}\n' * 100_000}
    path.write_text(texts["old"])
    pid = os.fork()
    if pid == 0:  # the child writes and is killed; it never returns into pytest
        try:
            die = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
            if kill == "mid-write":  # half the text is in the temporary file
                real_fdopen = os.fdopen

                def fdopen(*args, **kwargs):
                    f = real_fdopen(*args, **kwargs)
                    real_write = f.write
                    f.write = lambda text: (real_write(text[:len(text) // 2]), f.flush(), die())
                    return f
                os.fdopen = fdopen
            elif kill == "before-rename":
                os.replace = die
            else:
                real_replace = os.replace
                os.replace = lambda *args: (real_replace(*args), die())
            files.atomic_write_text(path, texts["new"])
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert path.read_text() == texts[left]
    assert all(p.name.startswith(".pairs.jsonl.") for p in tmp_path.iterdir() if p != path)  # hidden temp only


def test_a_model_save_killed_between_its_two_renames_is_undone_by_the_next_start(tmp_path):
    """save_hf_model moves the old directory aside, then renames the new one in: a kill between the
    two leaves neither under the final name. The next start_training puts the old one back."""
    out = tmp_path / "model"
    (out / "checkpoint-00000004").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    os.replace(out, tmp_path / ".model.old")  # the kill's state: old copy aside, new copy half-way
    (tmp_path / ".model.abc123.tmp").mkdir()
    models.clean_interrupted_save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-00000004", "metrics.jsonl"]


WRITERS = {"write_text", "write_bytes", "save_pretrained", "save_file", "save", "dump", "mkstemp", "mkdtemp"}
TEMP_THEN_RENAME = {  # the functions that may write a file, and why each is atomic
    "atomic_write_text": "writes a temporary file, then os.replace",
    "save_hf_model": "writes into a temporary directory, then renames it",
    "write_ref_cache": "writes .ref_logps.safetensors.tmp, then os.replace",
    "save_checkpoint": "DCP writes into .checkpoint-N.tmp, renamed when every process is done",
    "MetricsLog.__init__": "metrics.jsonl is an append-only log; a resume drops a line cut by a kill",
    "build_tokenizer": "embedded.py: writes into write_dir's temporary directory",
    "build_init_model": "embedded.py: writes into write_dir's temporary directory",
    "write_dir": "embedded.py: a temporary directory, then renamed",
    "lock_output_dir": "a lock file beside output_dir, not an output: it names the process holding it",
    "open_score_log": "label.py: an append-only log of scores; a line cut by a kill is skipped when read",
    "save_png": "brevity/plots.py: writes .NAME.tmp, then os.replace",
}


def test_every_write_of_a_stage_goes_to_a_temporary_name_first():
    """Scan the stages and the brevity package for calls that write files; each must sit in a function
    of TEMP_THEN_RENAME (and each of those must still write). A new direct write fails here with its place."""
    found, writers = [], set()
    package = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "brevity").glob("*.py"))]
    for script in (*package, "sft.py", "dpo.py", "sample.py", "label.py", "evaluate.py", "embedded.py"):
        tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
        for owner in ast.walk(tree):
            for fn in (n for n in ast.iter_child_nodes(owner) if isinstance(n, ast.FunctionDef)):
                name = f"{owner.name}.{fn.name}" if isinstance(owner, ast.ClassDef) else fn.name
                for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
                    callee = getattr(call.func, "attr", getattr(call.func, "id", ""))
                    mode = next((a.value for a in call.args[1:2] if isinstance(a, ast.Constant)), "r")
                    if callee in WRITERS or (callee in ("open", "fdopen") and set(str(mode)) & set("wax")):
                        writers.add(name)
                        if name not in TEMP_THEN_RENAME:
                            found.append(f"{script}:{call.lineno} in {name}: {callee}")
    assert not found, found
    assert writers == set(TEMP_THEN_RENAME)


def repository_python_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") or part in ("runs", "data")
                                                      for part in p.relative_to(ROOT).parts)]


def test_weights_are_loaded_only_from_safetensors(good, tmp_path):
    """A model directory with only a pickle checkpoint is refused before transformers reads it (the
    scans below check that transformers and vLLM are told so as well)."""
    model_with_only_pytorch_bin(good, tmp_path / "m")
    with pytest.raises(UserError, match="only safetensors are loaded"):
        models.load_model(str(tmp_path / "m"))


def product_python_files() -> list[Path]:
    """The stages and the brevity package: every file a pipeline run imports from the repository."""
    return sorted((ROOT / "brevity").glob("*.py")) + [ROOT / f"{stage}.py" for stage in STAGES]


def calls_in(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call)]


def keyword(call: ast.Call, name: str):
    """The constant value of keyword argument `name`, or None when it is absent or not a constant."""
    return next((getattr(k.value, "value", None) for k in call.keywords if k.arg == name), None)


def test_every_model_weight_load_asks_transformers_for_safetensors_only():
    """Every `X.from_pretrained(...)` of a model (not a tokenizer or config) passes use_safetensors=True,
    so transformers never falls back to a pickle file."""
    loads = []
    for path in product_python_files():
        for call in calls_in(path):
            if isinstance(call.func, ast.Attribute) and call.func.attr == "from_pretrained":
                receiver = ast.unparse(call.func.value)
                if "Tokenizer" not in receiver and "Config" not in receiver:
                    loads.append((f"{path.relative_to(ROOT)}:{call.lineno}", keyword(call, "use_safetensors")))
    assert [where for where, _ in loads] and all(value is True for _, value in loads), loads
    assert any(where.startswith("brevity/models.py:") for where, _ in loads)  # load_model's own call


def test_vllm_is_told_to_load_safetensors_only():
    llm_calls = [call for call in calls_in(ROOT / "sample.py") if ast.unparse(call.func) == "LLM"]
    assert llm_calls and all(keyword(call, "load_format") == "safetensors" for call in llm_calls)


def test_every_torch_load_passes_weights_only_true():
    calls = []
    for path in repository_python_files():
        for call in calls_in(path):
            if ast.unparse(call.func) == "torch.load":
                calls.append((f"{path.relative_to(ROOT)}:{call.lineno}", keyword(call, "weights_only") is True))
    assert calls  # the scan sees the loads there are (examples/convert_reward_head.py reads .bin shards)
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]


def test_remote_code_is_off_by_default_in_every_stage():
    for module, _ in STAGES.values():
        assert module.Settings().trust_remote_code is False


LOADERS = {"load_tokenizer", "load_model", "load_scorer", "RewardModel", "from_pretrained", "LLM"}


def test_every_loader_call_passes_the_trust_remote_code_flag_on_and_never_true():
    """In the stages and the package, each call that loads a model or tokenizer gets the flag from a
    `trust_remote_code` setting or argument (by keyword or position), never the constant True."""
    checked = set()
    for path in product_python_files():
        for call in calls_in(path):
            if getattr(call.func, "attr", getattr(call.func, "id", "")) not in LOADERS:
                continue
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            checked.add(path.name)
            flag = [k.value for k in call.keywords if k.arg == "trust_remote_code"]
            assert not any(isinstance(a, ast.Constant) and a.value is True for a in call.args), where
            assert all(ast.unparse(value).endswith("trust_remote_code") for value in flag), where
            assert flag or any(ast.unparse(a).endswith("trust_remote_code") for a in call.args), where
    assert {f"{stage}.py" for stage in STAGES} | {"models.py", "scoring.py"} <= checked  # every stage loads


def test_remote_code_runs_only_behind_the_flag(good, tmp_path, capsys):
    """A model that brings its own code is refused without --trust_remote_code, and its code never runs."""
    evil = tmp_path / "evil"
    shutil.copytree(good["model"], evil)
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"})
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    err = one_line_error(capsys, sample, (sample.Settings,), [
        "--model", str(evil), "--prompts", str(good["prompts"]), "--output", str(tmp_path / "s.jsonl")])
    assert "run only with --trust_remote_code" in err and not (tmp_path / "ran").exists()
