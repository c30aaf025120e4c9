"""Checkpoints: output_dir/checkpoint-STEP, written with torch.distributed.checkpoint (each process
writes its shards; any number of processes can load them). Only tensors go through DCP, which
loads them with torch.load(weights_only=True); the rest (step, optimizer hyperparameters, RNG
states) is JSON. The learning rate is a pure function of the step (`training.lr_at`).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import warnings
from pathlib import Path

import torch

from brevity.dist import Dist, barrier
from brevity.files import atomic_write_text, rmtree
from brevity.models import save_hf_model


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = sorted(p for p in Path(out_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit())
    return found[-1] if found else None


def _train_state(policy, optimizer, reference=None):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = get_optimizer_state_dict(policy, optimizer)
    state = {"model": get_model_state_dict(policy), "optimizer": optim["state"]}
    if reference is not None:
        state["reference"] = get_model_state_dict(reference)
    return state, optim["param_groups"]


def _rng_state() -> dict:
    def encode(t):
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    version, state, gauss = random.getstate()
    out = {"python": [version, list(state), gauss], "torch": encode(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = encode(torch.cuda.get_rng_state())
    return out


def _set_rng_state(state: dict) -> None:
    def decode(text):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


@contextlib.contextmanager
def _one_process_dcp():
    """DCP warns when it runs without a process group; on one process that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(out_dir: str | os.PathLike, step: int, policy, optimizer, d: Dist,
                    info: dict | None = None, reference=None) -> Path:
    """Write output_dir/checkpoint-STEP (model, optimizer, step, RNG states; a reference model that
    changes while training, if given) and delete older ones.

    Atomic: every process writes into a temporary directory, then rank 0 renames it, so a
    checkpoint directory is either complete or absent; an interrupted save leaves the last one.
    """
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    final, tmp = out_dir / f"checkpoint-{step:08d}", out_dir / f".checkpoint-{step:08d}.tmp"
    if d.is_main:
        rmtree(tmp)
    barrier(d)
    state, param_groups = _train_state(policy, optimizer, reference)
    with _one_process_dcp():
        dcp.save(state, checkpoint_id=tmp)
    atomic_write_text(tmp / f"rng_rank{d.rank}.json", json.dumps(_rng_state()))
    barrier(d)
    if d.is_main:
        atomic_write_text(tmp / "trainer_state.json", json.dumps(
            {**(info or {}), "step": step, "world_size": d.world_size, "param_groups": param_groups}, indent=1))
        rmtree(final)
        os.replace(tmp, final)
        for old in out_dir.glob("checkpoint-*"):
            if old != final:  # renamed first: a half-deleted checkpoint never shows under its name
                hidden = out_dir / f".{old.name}.tmp"
                os.replace(old, hidden)
                rmtree(hidden)
    barrier(d)
    return final


def load_checkpoint(path: str | os.PathLike, policy, optimizer, d: Dist, reference=None) -> dict:
    """Load a `save_checkpoint` directory into policy and optimizer (and the reference, if it was saved
    with one), resharding as needed; return its trainer_state.json (with "step": the optimizer steps
    already done)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    info = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    state, _ = _train_state(policy, optimizer, reference)
    with _one_process_dcp():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(policy, state["model"])
    if reference is not None:
        set_model_state_dict(reference, state["reference"])
    set_optimizer_state_dict(policy, optimizer, {"state": state["optimizer"], "param_groups": info["param_groups"]})
    rng = path / f"rng_rank{d.rank}.json"
    if rng.exists():  # absent when resuming on more processes than saved: the data order needs no RNG
        _set_rng_state(json.loads(rng.read_text(encoding="utf-8")))
    return info


def save_final_model(policy, tokenizer, out_dir: str | os.PathLike, d: Dist,
                     keep=("settings.json", "metrics.jsonl", "data_stats.json", "summary.json")) -> None:
    """Gather the full state dict onto rank 0's CPU and write output_dir as a Hugging Face model
    directory (`save_hf_model`, atomic). The run's small files named in `keep` are carried into it;
    checkpoints, no longer needed, leave with the old directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {}  # tied weights (one parameter, several names) are saved once, as transformers does
    for name, param in policy.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name in (n for group in names.values() for n in group[1:]):
        state.pop(name, None)
    if d.is_main:
        out_dir = Path(out_dir)
        extra = {name: (out_dir / name).read_bytes() for name in keep if (out_dir / name).is_file()}
        save_hf_model(policy.model, tokenizer, out_dir, state_dict=state, extra_files=extra)
    barrier(d)
