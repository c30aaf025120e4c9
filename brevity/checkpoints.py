"""Checkpoints: output_dir/checkpoint-STEP, written with torch.distributed.checkpoint (each process
writes its shards; any number of processes can load them). Only tensors go through DCP, which
loads them with torch.load(weights_only=True); the rest (step, optimizer hyperparameters, RNG
states, and the size of every file, to tell a whole checkpoint from a damaged one) is JSON. The last
two whole checkpoints are kept, so a damaged last one leaves one to resume from. The learning rate
is a pure function of the step (`training.lr_at`). A run holds a lock on its output_dir, so a second
run into it refuses instead of writing under the first.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import typing
import warnings
from pathlib import Path

import torch

from brevity.config import UserError
from brevity.dist import Dist, barrier
from brevity.files import atomic_write_text, read_json, rmtree
from brevity.models import save_hf_model


def checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """output_dir's checkpoint directories, oldest first."""
    return sorted(p for p in Path(out_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit())


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint directory (a file missing, cut short or grown), or None. The
    sizes are those trainer_state.json, written last, recorded; one written before they were is
    taken as it is."""
    try:
        info = read_json(path / "trainer_state.json")
    except UserError:
        info = None
    if not isinstance(info, dict):
        return "trainer_state.json is missing or damaged"
    for name, size in info.get("files", {}).items():
        found = (path / name).stat().st_size if (path / name).is_file() else None
        if found != size:
            return f"{name} is missing" if found is None else f"{name} has {found} bytes, {size} were written"
    return None


def resume_checkpoint(out_dir: str | os.PathLike, is_main: bool) -> tuple[Path | None, dict]:
    """The newest whole checkpoint in output_dir and its trainer_state.json ((None, {}) if there is
    none). A damaged newer one is passed over with a note; if every one is damaged, a UserError."""
    damaged = []
    for path in reversed(checkpoints(out_dir)):
        if (problem := checkpoint_problem(path)) is None:
            if damaged and is_main:
                print(f"note: {'; '.join(damaged)}; resuming from {path.name} instead")
            return path, read_json(path / "trainer_state.json")
        damaged.append(f"{path.name} is damaged ({problem})")
    if damaged:
        raise UserError(f"{out_dir}: {'; '.join(damaged)}, and no whole checkpoint is left; remove "
                        f"{'it' if len(damaged) == 1 else 'them'} to train from the start")
    return None, {}


_LOCKS: dict[str, typing.IO] = {}  # lock file -> its open file, held by this process


def lock_output_dir(out: Path, script: str) -> None:
    """Hold a lock on output_dir until `unlock_output_dir` or the process ends: a second run into it
    refuses at once instead of rewriting files under the first. The lock file sits beside output_dir
    (the final save replaces output_dir whole). A process that holds it may take it again."""
    import fcntl

    path = out.absolute().parent / f".{out.absolute().name}.lock"
    if str(path) in _LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"--output_dir {out}: {holder} is writing into it; wait for it to end, or choose another "
                        "--output_dir") from None
    f.truncate(0)
    f.write(f"{script}.py (process {os.getpid()})")
    f.flush()
    _LOCKS[str(path)] = f


@contextlib.contextmanager
def released_on_error(out: Path, held: bool):
    """Release this process's lock on output_dir (if `held`) when the block raises: a run that fails
    inside a process that lives on (a test, a notebook) does not keep other processes out."""
    try:
        yield
    except BaseException:
        if held:
            unlock_output_dir(out)
        raise


def unlock_output_dir(out: Path) -> None:
    path = out.absolute().parent / f".{out.absolute().name}.lock"
    if (f := _LOCKS.pop(str(path), None)) is not None:
        path.unlink(missing_ok=True)  # while still held: a process waiting on this file finds it locked
        f.close()


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
    changes while training, if given) and delete older ones but the newest whole one.

    Atomic: every process writes into a temporary directory, then rank 0 records every file's size
    in trainer_state.json and renames the directory, so a checkpoint directory is either complete or
    absent; an interrupted save leaves the earlier ones.
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
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_text(tmp / "trainer_state.json", json.dumps(
            {**(info or {}), "step": step, "world_size": d.world_size, "param_groups": param_groups,
             "with_reference": reference is not None, "files": sizes}, indent=1))
        rmtree(final)
        os.replace(tmp, final)
        older = [p for p in checkpoints(out_dir) if p.name < final.name]
        spare = next((p for p in reversed(older) if checkpoint_problem(p) is None), None)
        for old in checkpoints(out_dir):
            if old not in (final, spare):  # renamed first: a half-deleted checkpoint never shows under its name
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
    info = read_json(path / "trainer_state.json")
    saved_with = info.get("with_reference", reference is not None)  # older checkpoints did not record it
    if saved_with != (reference is not None):
        raise UserError(f"{path}: saved {'with' if saved_with else 'without'} a reference model that changes while "
                        f"training (--sync_ref_model), resumed {'with' if reference is not None else 'without'} one; "
                        "resume with the setting it was started with, or choose another --output_dir")
    state, _ = _train_state(policy, optimizer, reference)
    try:
        with _one_process_dcp():
            dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP raises many types for damaged files or the checkpoint of another model
        raise UserError(f"{path}: cannot load it ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); "
                        "remove it to resume from the one before, or choose another --output_dir") from None
    set_model_state_dict(policy, state["model"])
    if reference is not None:
        set_model_state_dict(reference, state["reference"])
    set_optimizer_state_dict(policy, optimizer, {"state": state["optimizer"], "param_groups": info["param_groups"]})
    rng = path / f"rng_rank{d.rank}.json"
    if rng.exists():  # absent when resuming on more processes than saved: the data order needs no RNG
        _set_rng_state(json.loads(rng.read_text(encoding="utf-8")))
    return info


def save_final_model(policy, tokenizer, out_dir: str | os.PathLike, d: Dist, keep: tuple[str, ...]) -> None:
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
