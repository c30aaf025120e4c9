"""Faults: bad input is refused in one line that names the file and the line or field, with exit
code 2 and nothing already written touched, or skipped with its count reported; a NaN or infinite
loss stops training before the update and keeps the last checkpoint; writes are atomic; the
defaults are safe (safetensors only, torch.load with weights_only, remote code only behind the flag).
RELIABILITY.md maps each promise to its test; kills at random points are in test_sigkill.py."""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT, pref_rows, sentence
from safetensors.torch import load_file

from brevity import checkpoints, dist, files, fsdp, models
from brevity.config import UserError, run_main
import dpo
import evaluate
import label
import losses
import sample
import sft

STAGES = {"sft": (sft, (sft.Settings,)), "dpo": (dpo, dpo.settings_classes), "sample": (sample, (sample.Settings,)),
          "label": (label, (label.Settings,)), "evaluate": (evaluate, (evaluate.Settings,))}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; one thread also makes reruns bitwise equal."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


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
    paths = {"model": tiny_model_dir}
    for name, rows in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_bytes(jsonl(rows))
    (root / "scorers.py").write_text(
        "def length(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
        "def constant(prompts, responses):\n    return [1.0 for _ in responses]\n"
        "def nan(prompts, responses):\n    return [float('nan') for _ in responses]\n"
        "def inf(prompts, responses):\n    return [float('inf') for _ in responses]\n")
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


# ---------------------------------------------------------------------------------------------
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


@dataclasses.dataclass
class Case:
    stage: str
    flag: str  # where the bad input goes
    make: Callable  # g -> bytes (a file), or (g, path) -> None (a directory)
    expect: str = ""  # a fragment of the one-line error
    counted: Callable | None = None  # or: the run succeeds, and this checks the reported count
    flags: dict = dataclasses.field(default_factory=dict)  # other flags changed for the case
    writes: tuple = ()  # files the failing run writes on purpose (the statistics that explain it)

    @property
    def is_dir(self) -> bool:
        return self.make.__code__.co_argcount == 2


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
    "label-nan-scores": Case("label", "--reward_fn", lambda g: b"", "row 1: response 1 got score nan",
                             flags={"--reward_fn": "{scorers}:nan"}),
    "label-infinite-scores": Case("label", "--reward_fn", lambda g: b"", "row 1: response 1 got score inf",
                                  flags={"--reward_fn": "{scorers}:inf"}),
    "label-every-pair-ties": Case("label", "--reward_fn", lambda g: b"", "no pair survived (4 ties",
                                  flags={"--reward_fn": "{scorers}:constant"},
                                  writes=("scores.jsonl", "label_stats.json", "label_settings.json")),
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
    "evaluate-nan-gold-scores": Case("evaluate", "--gold_fn", lambda g: b"", "gold scorer returned nan for the policy response to prompt 0",
                                     flags={"--gold_fn": "{scorers}:nan"}),
    "evaluate-model-only-pytorch-bin": Case("evaluate", "--model", model_with_only_pytorch_bin,
                                            "{bad}: no *.safetensors weights"),
    "evaluate-sft-model-without-weights": Case("evaluate", "--sft_model", model_without_weights,
                                               "{bad}: no *.safetensors weights"),
    "evaluate-config-unknown-key": Case("evaluate", "--config", config(b"bogus: 1\n"), "{bad}: unknown key 'bogus'"),
}


def argv_for(case: Case, g: dict, out: Path, bad: Path) -> list[str]:
    flags = {**command(case.stage, g, out), case.flag: bad}
    for flag, value in case.flags.items():
        if value is DELETE:
            flags.pop(flag)
        else:
            flags[flag] = value.format(scorers=g["scorers"]) if isinstance(value, str) else value
    return [str(x) for flag, value in flags.items() for x in ([flag] if value is None else [flag, value])]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_file_and_line_or_a_counted_skip(name, good, tmp_path, capsys):
    case = CASES[name]
    bad = tmp_path / ("bad model" if case.is_dir else "bad.yaml" if case.flag == "--config" else "bad.jsonl")
    if case.is_dir:
        case.make(good, bad)
    else:
        bad.write_bytes(case.make(good))
    out = tmp_path / "out"
    if case.flag in ("--reward_fn", "--gold_fn"):  # the bad thing is the scorer's output, not a file
        bad = case.flags[case.flag].format(scorers=good["scorers"])
    module, classes = STAGES[case.stage]
    if case.counted:
        run_main(module.main, classes, argv_for(case, good, out, bad))
        case.counted(out, capsys.readouterr().out)
        return
    earlier_output(case.stage, out)
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_:
        run_main(module.main, classes, argv_for(case, good, out, bad))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert case.expect.format(bad=bad) in err, err
    after = snapshot(out)
    assert {k: after.get(k) for k in before} == before  # nothing already written is touched
    assert set(after) - set(before) <= set(case.writes)


def test_the_real_command_prints_the_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "samples.jsonl"
    bad.write_bytes(jsonl([{"prompt": "x", "responses": [response("a")]}]) + b'{"prompt": "\xff"}\n')
    result = subprocess.run([sys.executable, "label.py", "--samples", str(bad), "--reward_fn", "embedded:proxy_reward"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {bad}:2: not UTF-8 (invalid start byte at byte 12)\n"


# ---------------------------------------------------------------------------------------------
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
        calls.append(1)
        pair_losses, chosen, rejected = real.fn(**kwargs)
        return pair_losses * (float("nan") if len(calls) == 5 else 1.0), chosen, rejected

    monkeypatch.setitem(losses.LOSSES, "dpo", losses.Loss(nan_in_step_5, reference_free=False))
    out = tmp_path / "out"
    flags = train_flags(tiny_model_dir, tiny_prefs_jsonl, out, "--loss", "dpo", "--resume")
    err = one_line_error(capsys, dpo, dpo.settings_classes, flags)
    assert err == (f"error: dpo.py: step 5: loss is nan; stopping. The last good checkpoint (step 4) is in "
                   f"{out}/checkpoint-00000004; resume from it with --resume and a lower --lr, or check the data\n")
    assert [p.name for p in out.glob("*checkpoint-*")] == ["checkpoint-00000004"]
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
        return sums * torch.tensor([float("inf") if len(calls) == 3 else 1.0, 1.0])

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


# ---------------------------------------------------------------------------------------------
# Atomic writes: a file under its final name is whole; a model or checkpoint directory is whole or absent.

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


# ---------------------------------------------------------------------------------------------
# Safe by default.

def repository_python_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") or part in ("runs", "data")
                                                      for part in p.relative_to(ROOT).parts)]


def test_weights_are_loaded_only_from_safetensors(good, tmp_path):
    model_with_only_pytorch_bin(good, tmp_path / "m")
    with pytest.raises(UserError, match="only safetensors are loaded"):
        models.load_model(str(tmp_path / "m"))
    for script in ("brevity/models.py", "sample.py"):  # transformers and vLLM are told so as well
        source = (ROOT / script).read_text(encoding="utf-8")
        assert source.count("use_safetensors=True") + source.count('load_format="safetensors"') >= 1


def test_every_torch_load_passes_weights_only_true():
    calls = []
    for path in repository_python_files():
        for call in (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call)):
            if ast.unparse(call.func) == "torch.load":
                ok = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords)
                calls.append((f"{path.relative_to(ROOT)}:{call.lineno}", ok))
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]


def test_remote_code_runs_only_behind_the_flag(good, tmp_path, capsys):
    for module, _ in STAGES.values():
        assert module.Settings().trust_remote_code is False
    # In the code, trust_remote_code is only ever passed on from the flag, never set to True.
    loaders = {"load_tokenizer", "load_model", "load_scorer", "RewardModel", "from_pretrained", "LLM"}
    for path in [ROOT / f"{s}.py" for s in ("common", *STAGES)]:
        for call in (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call)):
            loader = getattr(call.func, "attr", getattr(call.func, "id", "")) in loaders
            values = [k.value for k in call.keywords if k.arg == "trust_remote_code"] + [
                a for a in call.args if loader and isinstance(a, ast.Constant) and a.value is True]
            for value in values:
                assert ast.unparse(value).endswith("trust_remote_code"), f"{path.name}:{call.lineno}"
    # A model that brings its own code is refused without the flag, and its code never runs.
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
