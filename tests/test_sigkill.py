"""SIGKILL at a random point of each stage, then the same command again: the run ends with the very
files of a run never killed, the rerun does not redo what the killed run finished, and right after
the kill no file is visible half-written under its final name (RELIABILITY.md).

The kill point: the stage's real command runs under a tracer that counts the lines of the
repository's own code as they execute. A first run, never killed, counts them (and is the reference
the others are compared with); the killed run gets SIGKILL before line k, k drawn uniformly from
all of them, so a kill can land anywhere, between a file's last write and its rename included.
k comes from a seed that changes from run to run: the suite keeps trying new points, and a failure
prints the seed (BREVITY_KILL_SEED=... reruns that very point). dpo.py's kills at chosen points
(inside a step, inside a checkpoint save, on two processes) are in test_train_processes.py.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, pref_rows, save_model_dir, sentence, write_jsonl
from safetensors.torch import load_file

SEED = int(os.environ.get("BREVITY_KILL_SEED", random.SystemRandom().randrange(10**6)))
ENV = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           PYTHONHASHSEED="0")  # the same lines run in the same order, run after run

TRACED = r"""
import os, signal, sys
root, stage = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
sys.argv = [os.path.join(root, stage + ".py")] + sys.argv[3:]
kill_at, lines = int(os.environ.get("KILL_AT", "0")), 0

def count(frame, event, arg):
    global lines
    if event == "line":
        lines += 1
        if lines == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return count

def trace(frame, event, arg):  # only the repository's code is counted, so the tracer costs little
    return count if frame.f_code.co_filename.startswith(root) else None

import importlib
module = importlib.import_module(stage)
import transformers.models.llama.modeling_llama  # imported untraced: the stage's own lines are the points
sys.settrace(trace)
try:
    module.run_main(module.main, getattr(module, "settings_classes", None) or (module.Settings,))
finally:
    sys.settrace(None)
    if not kill_at:
        with open(os.environ["COUNT_FILE"], "w") as f:
            f.write(str(lines))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer, tiny_model_dir, tiny_sft_jsonl, tiny_prefs_jsonl) -> dict[str, Path]:
    """Every stage's input: two tiny models, SFT rows, pairs, prompts, samples, eval rows, scorers."""
    root = tmp_path_factory.mktemp("kill_inputs")
    rng = random.Random(3)
    samples = [{"prompt": sentence(rng, 2, 8), "responses": [
        {"text": text, "num_tokens": len(text.split()) + 1, "finish_reason": rng.choice(["eos", "eos", "length"])}
        for text in (sentence(rng, 1, 9) for _ in range(4))]} for _ in range(12)]
    (root / "scorers.py").write_text(
        "def length(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
        "def gold(prompts, responses):\n    return [r.count('a') - 0.1 * len(r.split()) for r in responses]\n")
    return {
        "model": tiny_model_dir, "other_model": save_model_dir(root / "other model", tiny_tokenizer, seed=1),
        "sft": tiny_sft_jsonl, "prefs": tiny_prefs_jsonl,
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": sentence(rng, 2, 10)} for _ in range(10)]),
        "samples": write_jsonl(root / "samples.jsonl", samples),
        "eval": write_jsonl(root / "eval.jsonl", [{"prompt": r["prompt"], "chosen": r["rejected"]}
                                                  for r in pref_rows(8, seed=5)]),
        "scorers": root / "scorers.py",
    }


def command(stage: str, i: dict, out: Path) -> list[str]:
    """The stage's command line, writing into `out`; the same command for the first run and the rerun."""
    train = ["--batch_size", "8", "--max_steps", "6", "--save_every", "2", "--lr", "3e-3",
             "--activation_checkpointing", "false", "--resume"]
    return {
        "sft": ["--model", i["model"], "--data", i["sft"], "--output_dir", out / "model", *train],
        "dpo": ["--model", i["model"], "--data", i["prefs"], "--output_dir", out / "model", "--warmup_steps", "0",
                *train],
        "sample": ["--model", i["model"], "--prompts", i["prompts"], "--output", out / "samples.jsonl", "--n", "2",
                   "--max_new_tokens", "8", "--save_every", "3", "--batch_size", "4"],
        "label": ["--samples", i["samples"], "--output_dir", out, "--reward_fn", f"{i['scorers']}:length"],
        "evaluate": ["--model", i["other_model"], "--sft_model", i["model"], "--prompts", i["eval"],
                     "--gold_fn", f"{i['scorers']}:gold", "--output_dir", out / "eval",
                     "--sft_generations", out / "sft_generations.jsonl", "--max_new_tokens", "8", "--batch_size", "3"],
    }[stage]


def run(stage: str, args: list, **env) -> subprocess.CompletedProcess:
    """The stage's real command; with KILL_AT or COUNT_FILE in env, under the line-counting tracer."""
    traced = [sys.executable, "-c", TRACED, str(ROOT), stage] if env else [sys.executable, f"{stage}.py"]
    return subprocess.run(traced + [str(a) for a in args], cwd=ROOT, env={**ENV, **env}, capture_output=True,
                          text=True, timeout=300)


def same_results(stage: str, reference: Path, out: Path) -> None:
    """The files a stage exists for: byte-identical, or tensor-equal weights and equal losses."""
    if stage in ("sft", "dpo"):
        a, b = load_file(reference / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        losses = [[json.loads(line)["loss"] for line in (d / "model" / "metrics.jsonl").read_text().splitlines()]
                  for d in (reference, out)]
        assert losses[0] == losses[1] and len(losses[0]) == 6  # every step once, with the same value
        assert not list((out / "model").glob("*checkpoint-*"))
        return
    names = {"sample": ["samples.jsonl"], "label": ["scores.jsonl", "pairs.jsonl", "label_stats.json"],
             "evaluate": ["eval/eval.json", "eval/details.jsonl", "eval/generations.json", "sft_generations.jsonl"]}
    for name in names[stage]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def assert_nothing_half_written(folder: Path) -> None:
    """Every file under its final name (no dot-named part in its path) is whole, and so is every
    checkpoint directory. metrics.jsonl and label.py's score logs are the append-only ones: the last
    line may be cut, and the resumed run drops it."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_dir() and path.name.startswith("checkpoint-"):
            assert {".metadata", "trainer_state.json", "rng_rank0.json"} <= {p.name for p in path.iterdir()}, rel
        elif path.suffix == ".jsonl" and path.stat().st_size:
            text = path.read_text(encoding="utf-8")
            append_only = path.name == "metrics.jsonl" or "scores.jsonl.parts" in rel.parts
            lines = text.splitlines()[:-1] if append_only else text.splitlines()
            assert append_only or text.endswith("\n"), rel
            for line in lines:
                json.loads(line)
        elif path.suffix == ".jsonl":
            assert path.name == "metrics.jsonl" or "scores.jsonl.parts" in rel.parts, f"{rel} is empty"
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            load_file(path)
        if path.name == "config.json" and (path.parent / "tokenizer.json").exists():  # a model directory
            assert (path.parent / "model.safetensors").is_file(), rel


def rerun_note(stage: str, out: Path) -> str | None:
    """What the rerun must say, given what the killed run left: it skips or resumes finished work."""
    model = out / "model"
    if stage in ("sft", "dpo"):
        if (model / "model.safetensors").exists():
            return "nothing to do"
        checkpoints = sorted(model.glob("checkpoint-*"))
        return f"(step {int(checkpoints[-1].name[11:])} of 6)" if checkpoints else None
    if stage == "sample":
        if (out / "samples.jsonl").exists():
            return "nothing to do"
        parts = list((out / "samples.jsonl.parts").glob("part-*.jsonl"))
        done = sum(len(p.read_text().splitlines()) for p in parts)
        return f"{done} already done" if done else None
    done = {"label": ["scores.jsonl", "label_stats.json", "pairs.jsonl"], "evaluate": ["eval/eval.json"]}[stage]
    return "nothing to do" if all((out / name).exists() for name in done) else None


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo", "sample", "label", "evaluate"])
def test_sigkill_at_a_random_point_then_the_same_command_ends_as_a_run_never_killed(stage, inputs, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed run"
    counted = run(stage, command(stage, inputs, reference), COUNT_FILE=str(tmp_path / "lines"))
    assert counted.returncode == 0, counted.stderr[-3000:]
    lines = int((tmp_path / "lines").read_text())
    kill_at = random.Random(f"{SEED}:{stage}").randint(1, lines)
    where = f"{stage}.py killed before line {kill_at} of {lines} (BREVITY_KILL_SEED={SEED})"

    killed = run(stage, command(stage, inputs, out), KILL_AT=str(kill_at))
    assert killed.returncode == -9, f"{where}: {killed.stderr[-3000:]}"
    out.mkdir(exist_ok=True)
    assert_nothing_half_written(out)
    note = rerun_note(stage, out)

    rerun = run(stage, command(stage, inputs, out))
    assert rerun.returncode == 0, f"{where}: {rerun.stderr[-3000:]}"
    assert note is None or note in rerun.stdout, f"{where}: expected {note!r} in {rerun.stdout!r}"
    same_results(stage, reference, out)
    # A kill inside a write can leave that write's hidden temporary file; nothing reads it, and any
    # larger leftover (a model or checkpoint being written) is cleaned up by the rerun. A kill also
    # leaves the lock file beside a training output_dir (its lock went with the process).
    leftovers = [p for p in out.rglob(".*") if p.is_dir() or not p.name.endswith((".tmp", ".lock"))]
    assert not leftovers, f"{where}: {leftovers}"
