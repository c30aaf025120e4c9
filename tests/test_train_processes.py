"""dpo.py and sft.py as processes: torchrun with 2 CPU processes (gloo, FSDP2) matches one process;
a run killed with SIGKILL and rerun with --resume ends with the very weights of a run never
interrupted, also when the kill lands inside a checkpoint save, and a checkpoint written by 2
processes resumes on 1.

Tolerance, 2 processes vs 1: per-step losses within 1e-6 and final weights within 1e-5 after 7 Adam steps at
lr 1e-3 (--compute_dtype float32; only the order of the gradient sums differs: measured ~1e-7 and ~1e-6; in
bfloat16 the weights' rounding would amplify that order, test_precision.py covers bfloat16). One process killed and
resumed vs never killed: bitwise equal (same thread count, same order of every operation).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import sft
from brevity.config import run_main

pytestmark = pytest.mark.slow  # torchrun and SIGKILL'd subprocesses: tens of seconds each
ENV = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch.distributed.checkpoint as dcp
import {stage} as stage
where, at = os.environ["KILL_WHERE"], int(os.environ["KILL_AT"])
calls = 0

def killing(fn, after):
    def wrapped(*args, **kwargs):
        global calls
        calls += 1
        if calls == at and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = fn(*args, **kwargs)
        if calls == at and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped

if where == "step":  # at the start of a step's forward/backward
    stage.accumulate_gradients = killing(stage.accumulate_gradients, after=False)
else:  # a checkpoint's tensors are written, its directory not yet renamed
    dcp.save = killing(dcp.save, after=True)
stage.run_main(stage.main, getattr(stage, "settings_classes", None) or (stage.Settings,))
"""


def dpo_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--loss", "ilrdpo",
            "--batch_size", "8", "--max_steps", "7", "--lr", "1e-3", "--warmup_steps", "2", "--save_every", "2",
            "--compute_dtype", "float32", *extra]


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **kwargs.pop("env", {})}, capture_output=True, text=True,
                          timeout=300, **kwargs)


def run_killed(tmp_path, args, where, at, stage="dpo", processes=1):
    killer = tmp_path / f"kill_{stage}.py"
    killer.write_text(KILLER.format(root=str(ROOT), stage=stage))
    launcher = TORCHRUN if processes > 1 else [sys.executable]
    return run(launcher + [str(killer)] + args, env={"KILL_WHERE": where, "KILL_AT": str(at)})


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def check(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_prefs_jsonl, tmp_path_factory):
    """One process, 7 steps (crossing an epoch boundary), never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    check(run([sys.executable, "dpo.py"] + dpo_args(tiny_model_dir, tiny_prefs_jsonl, out)))
    return out


def test_two_processes_give_the_same_steps_and_weights_as_one(uninterrupted, tiny_model_dir, tiny_prefs_jsonl,
                                                             tmp_path):
    out = tmp_path / "two"
    check(run(TORCHRUN + ["dpo.py"] + dpo_args(tiny_model_dir, tiny_prefs_jsonl, out)))
    one, two = losses(uninterrupted), losses(out)
    assert len(one) == len(two) == 7
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-6, (one, two)
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def test_two_processes_with_compiled_layers_give_the_steps_of_one(uninterrupted, tiny_model_dir, tiny_prefs_jsonl,
                                                                  tmp_path):
    """--torch_compile under FSDP2: each layer's compiled forward runs between FSDP2's hooks (which stay
    eager, on the module), so the sharded run trains as the eager one process does, within float32
    reordering."""
    out = tmp_path / "two"
    check(run(TORCHRUN + ["dpo.py"] + dpo_args(tiny_model_dir, tiny_prefs_jsonl, out, "--torch_compile", "true")))
    one, two = losses(uninterrupted), losses(out)
    assert len(one) == len(two) == 7 and max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)


def test_sft_two_processes_give_the_same_steps_as_one(tiny_model_dir, tiny_sft_jsonl, tmp_path):
    args = ["--model", str(tiny_model_dir), "--data", str(tiny_sft_jsonl), "--batch_size", "8", "--max_steps", "4",
            "--lr", "3e-3", "--compute_dtype", "float32"]
    check(run(TORCHRUN + ["sft.py", "--output_dir", str(tmp_path / "two")] + args))
    sft.main(sft.Settings(model=str(tiny_model_dir), data=str(tiny_sft_jsonl), output_dir=str(tmp_path / "one"),
                          batch_size=8, max_steps=4, lr=3e-3, compute_dtype="float32"))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 4 and max(abs(a - b) for a, b in zip(one, two)) < 1e-6, (one, two)


@pytest.mark.parametrize("where, at, left", [
    ("step", 6, ["checkpoint-00000002", "checkpoint-00000004"]),  # killed in step 6; the last two are kept
    ("save", 2, ["checkpoint-00000002"]),  # killed inside the save of step 4: step 2's is the last whole one
])
def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(where, at, left, uninterrupted,
                                                                          tiny_model_dir, tiny_prefs_jsonl,
                                                                          tmp_path, capsys):
    out = tmp_path / "out"
    args = dpo_args(tiny_model_dir, tiny_prefs_jsonl, out)
    killed = run_killed(tmp_path, args, where, at)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == left
    assert not (out / "model.safetensors").exists()
    if where == "step":  # a rerun without --resume refuses to overwrite the checkpoint
        import dpo

        with pytest.raises(SystemExit):
            run_main(dpo.main, dpo.settings_classes, args)
        assert "pass --resume to continue it" in capsys.readouterr().err
    check(run([sys.executable, "dpo.py"] + args + ["--resume"]))
    assert losses(out) == losses(uninterrupted)  # every step once, the same values
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob("*checkpoint-*"))


def test_a_checkpoint_of_two_processes_resumes_on_one(uninterrupted, tiny_model_dir, tiny_prefs_jsonl, tmp_path):
    out = tmp_path / "out"
    args = dpo_args(tiny_model_dir, tiny_prefs_jsonl, out)
    killed = run_killed(tmp_path, args, "step", 4, processes=2)  # 2 processes, killed in step 4
    assert killed.returncode != 0 and (out / "checkpoint-00000002").is_dir(), killed.stderr[-3000:]
    check(run([sys.executable, "dpo.py"] + args + ["--resume"]))
    one, resumed = losses(uninterrupted), losses(out)
    assert len(resumed) == 7 and max(abs(x - y) for x, y in zip(one, resumed)) < 1e-6
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--loss", "dpo", "--ld_alpha", "0.5", "--use_weighting"],
                                   ["--loss", "dpo", "--sampo", "--sync_ref_model", "--ref_model_sync_steps", "2"]],
                         ids=["per-token-reference-cache", "tr-dpo-live-reference"])
def test_two_processes_give_the_steps_and_weights_of_one_with_per_token_options(flags, tiny_model_dir,
                                                                                 tiny_prefs_jsonl, tmp_path):
    """The per-token reference cache computed on 2 processes, and TR-DPO's live reference (sharded like the
    policy and moved shard by shard), train as on one, within the tolerances above."""
    args = ["--data", str(tiny_prefs_jsonl), "--model", str(tiny_model_dir), "--batch_size", "8", "--max_steps", "5",
            "--lr", "1e-3", "--warmup_steps", "0", "--save_every", "0", "--compute_dtype", "float32", *flags]
    check(run([sys.executable, "dpo.py", "--output_dir", str(tmp_path / "one")] + args))
    check(run(TORCHRUN + ["dpo.py", "--output_dir", str(tmp_path / "two")] + args))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 5 and max(abs(a - b) for a, b in zip(one, two)) < 1e-6, (one, two)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
