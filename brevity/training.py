"""What sft.py and dpo.py share: their settings, the data order, the learning-rate schedule, the
metrics log and the run's lifecycle (start, resume, checkpoints, final save).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from pathlib import Path

import torch

from brevity.batches import global_batches
from brevity.checkpoints import (latest_checkpoint, load_checkpoint, lock_output_dir, released_on_error,
                                 resume_checkpoint, save_checkpoint, save_final_model, unlock_output_dir)
from brevity.config import UserError, setting
from brevity.dist import Dist, all_reduce_sum, cleanup_distributed, setup_distributed
from brevity.files import atomic_write_text, check_output_path, read_json, rmtree, save_settings
from brevity.models import COMPUTE_DTYPE_HELP, clean_interrupted_save, final_model_exists
from brevity.tracking import Tracker, check_tracker, start_tracker

RUN_FILES = ("settings.json", "metrics.jsonl", "data_stats.json", "summary.json")  # carried into the final model


@dataclasses.dataclass
class TrainSettings:
    """The knobs of every training script; sft.py and dpo.py subclass it and change some defaults."""
    model: str = setting("", "starting model: a local Hugging Face directory or a hub id")
    data: str = setting("", "training data: a JSONL file, a directory saved by `datasets`, or a hub dataset id")
    output_dir: str = setting("", "gets the trained model (a Hugging Face directory), settings.json, metrics.jsonl, "
                                  "data_stats.json; checkpoints while training")
    seed: int = setting(0, "seed of the data order")
    resume: bool = setting(False, "continue from the last checkpoint in output_dir, if there is one")
    epochs: int = setting(1, "passes over the data")
    max_steps: int = setting(-1, "optimizer steps (cycling through the data); -1: as many as `epochs` give")
    batch_size: int = setting(64, "examples (pairs, for dpo.py) per optimizer step, over all processes")
    grad_accum: int = setting(1, "micro-steps per optimizer step; a micro-batch is "
                                 "batch_size / (processes * grad_accum)")
    lr: float = setting(1e-5, "peak learning rate (AdamW, betas 0.9/0.999)")
    lr_schedule: typing.Literal["constant", "linear", "cosine"] = setting(
        "cosine", "after warm-up: constant, or a linear or cosine decay to 0 at the last step")
    warmup_steps: int = setting(0, "linear warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this; 0: no clipping")
    max_length: int = setting(1024, "at most this many tokens per sequence: prompt + response + EOS")
    max_prompt_length: int = setting(-1, "longer prompts lose tokens from the left (their end matters most); "
                                         "-1: half of max_length")
    truncate_responses: bool = setting(False, "cut a response that would pass max_length, instead of dropping "
                                              "its example")
    bucket_batches: int = setting(32, "length bucketing: a shuffled epoch is sorted by length within windows of "
                                      "this many batches, then the batches are shuffled; 1: within a batch only")
    save_every: int = setting(200, "write a resumable checkpoint every this many steps (the last two whole ones "
                                   "are kept); 0: never")
    dtype: typing.Literal["float32", "bfloat16"] = setting(
        "float32", "dtype of the parameters, gradients and optimizer state, and of the saved model (float32: master "
                   "weights, whatever --compute_dtype; bfloat16 parameters compute in bfloat16)")
    compute_dtype: typing.Literal["auto", "float32", "bfloat16"] = setting("auto", COMPUTE_DTYPE_HELP)
    activation_checkpointing: bool = setting(True, "recompute each decoder layer in backward: less memory for "
                                                   "more time (on, as in TRL); false: faster")
    torch_compile: bool = setting(False, "torch.compile each decoder layer (inductor, dynamic shapes; a C++ "
                                         "compiler on CPU): faster steps once the first ones have compiled")
    chunk_size: int = setting(1024, "response tokens per LM-head chunk; the log-prob peak is chunk_size x vocab floats")
    trust_remote_code: bool = setting(False, "run model/tokenizer code from the hub (only for models you trust)")
    wandb_project: str = setting("", "also log the metrics to this Weights & Biases project (pip install wandb; "
                                     "WANDB_MODE=offline needs no network); empty: off")

    def __post_init__(self):
        if self.max_prompt_length == -1:
            self.max_prompt_length = self.max_length // 2


def check_train_settings(s: TrainSettings, d: Dist) -> None:
    if s.batch_size < 1 or s.grad_accum < 1 or s.batch_size % (d.world_size * s.grad_accum):
        raise UserError(f"--batch_size {s.batch_size} must be a positive multiple of processes x --grad_accum "
                        f"({d.world_size} x {s.grad_accum})")
    if not 0 < s.max_prompt_length < s.max_length:
        raise UserError(f"need 0 < --max_prompt_length ({s.max_prompt_length}) < --max_length ({s.max_length})")
    if s.epochs < 1 and s.max_steps < 1:
        raise UserError("need --epochs >= 1 or --max_steps >= 1")
    if not (s.max_steps == -1 or s.max_steps >= 1):
        raise UserError(f"--max_steps {s.max_steps}: need -1 (as many as --epochs give) or >= 1")
    for name in ("chunk_size", "bucket_batches"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name} {getattr(s, name)}: need >= 1")
    for name in ("warmup_steps", "save_every"):
        if getattr(s, name) < 0:
            raise UserError(f"--{name} {getattr(s, name)}: need >= 0")
    if not 0 < s.lr < 1e30:  # nan and inf too; AdamW's first step, lr / (1 - 0.9), must fit in float32
        raise UserError(f"--lr {s.lr}: need 0 < lr < 1e30")
    if not (0 <= s.weight_decay < math.inf and 0 <= s.max_grad_norm < math.inf):
        raise UserError(f"--weight_decay {s.weight_decay}, --max_grad_norm {s.max_grad_norm}: need finite values >= 0")
    # inductor builds its CPU kernels with the first of $CXX and g++ that it finds (its config.cpp.cxx);
    # without either the first step would fail, after the reference pass, in a long traceback
    if s.torch_compile and d.device.type == "cpu":
        compilers = [c for c in (os.environ.get("CXX"), "g++") if c]
        if not any(shutil.which(c) for c in compilers):
            raise UserError(f"--torch_compile on CPU needs a C++ compiler, and none of {', '.join(compilers)} is on "
                            "PATH (install g++ or set CXX), or leave --torch_compile off")


def lr_at(step: int, s: TrainSettings, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (from 0): linear warm-up, then the schedule. A pure
    function of the step, so the step is all of the scheduler's state a checkpoint needs."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps)
    if s.lr_schedule == "linear":
        return s.lr * (1 - progress)
    if s.lr_schedule == "cosine":
        return s.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return s.lr


def peak_memory_gib(d: Dist) -> float:
    """This process's peak memory: CUDA memory allocated on GPU, resident set size on CPU."""
    if d.device.type == "cuda":
        return torch.cuda.max_memory_allocated(d.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step, appended and flushed by rank 0.

    On resume the rows after the checkpoint's step (written by the interrupted run, about to be
    redone) are dropped first, so every step appears once.
    """

    def __init__(self, path: str | os.PathLike, d: Dist, resume_step: int = 0):
        self.file = None
        if not d.is_main:
            return
        path = Path(path)
        kept = []
        if resume_step and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
        self.file = open(path, "a", encoding="utf-8")

    def log(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def unmap_large_blocks_when_freed(threshold: int = 4 << 20) -> None:
    """Have glibc give every allocation of `threshold` bytes or more its own mmap, returned to the
    OS when freed. By default glibc raises that threshold to the size of each large block freed
    (up to 32 MiB), so from the first step on a training step's activations and logits chunks come
    from its heap, whose free space the step's mix of sizes fragments, and the heap grows well past
    the live tensors (BENCHMARKS.md has the figures). The price is zeroing fresh pages for those
    blocks (a lower threshold saves more memory and costs more time). For the whole process; an
    explicit MALLOC_MMAP_THRESHOLD_ wins; a no-op without glibc."""
    import ctypes

    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # musl has a mallopt that ignores it
        ctypes.CDLL(None).mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also stops the raising


def trim_heap() -> None:
    """Hand the free pages of glibc's heap back to the OS (malloc_trim), as between two training steps:
    what a step freed below the mmap threshold (`unmap_large_blocks_when_freed`) stays mapped, in
    fragments the next step's other sizes reuse only in part, so the resident size creeps up step
    after step (BENCHMARKS.md). A pass over the free lists, milliseconds; a no-op without glibc."""
    import ctypes

    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


def adamw(policy, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the policy's parameters (betas 0.9/0.999), fused: one pass per step over each
    parameter, its gradient and its two moments, where the default runs one pass per elementwise
    operation (about ten); the same update up to rounding, the same state in checkpoints."""
    return torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=True)


def set_lr(optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def all_reduce_sums(d: Dist, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: its sum over every process} for per-process sums (0-dim tensors, the same names in the
    same order on every process), in one all-reduce."""
    total = all_reduce_sum(d, torch.stack([v.detach().float() for v in sums.values()]).to(d.device))
    return dict(zip(sums, total.tolist()))


def check_run_location(s: TrainSettings) -> None:
    """The final save replaces output_dir whole (its old contents leave with the old directory), so it
    must not be the working directory or above it, nor hold an input of the run (--model, --data, ...)."""
    out, cwd = Path(s.output_dir).resolve(), Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UserError(f"--output_dir {s.output_dir}: is the working directory or holds it; the final save replaces "
                        "output_dir whole, so give it a directory of its own")
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if f.name != "output_dir" and isinstance(value, str) and value and Path(value).exists():
            path = Path(value).resolve()
            if path == out or out in path.parents:
                raise UserError(f"--output_dir {s.output_dir}: holds --{f.name} {value}; the final save replaces "
                                "output_dir whole, so give it a directory of its own")


def check_only_run_files(out: Path, script: str, keep: tuple[str, ...]) -> None:
    """An existing output_dir may hold only what a run of `script` writes there (the final save would
    delete anything else): its files, checkpoints and hidden temporary ones."""
    own = {*RUN_FILES, *keep}
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in own
                     and not (p.is_dir() and p.name.startswith("checkpoint-"))) if out.is_dir() else []
    if foreign:
        raise UserError(f"--output_dir {out}: holds {foreign[0]!r}" + (f" and {len(foreign) - 1} more" if foreign[1:]
                        else "") + f", not of a {script}.py run; the final save replaces output_dir whole, so choose "
                        "a new or empty directory")


def start_training(s: TrainSettings, script: str, unit: str, keep: tuple[str, ...] = ()) -> Run | None:
    """The common start of sft.py and dpo.py: a `Run`, or None when output_dir already holds the final
    model (a rerun is a no-op). Rank 0 locks output_dir first (`lock_output_dir`). A checkpoint found
    without --resume is an error rather than silently overwritten; with --resume, a damaged one is
    passed over for the one before it; leftovers of an interrupted save go. `unit` names what a batch
    counts ("pairs"); `keep` names the script's own files in output_dir, carried into the final model."""
    out = Path(s.output_dir)
    check_output_path(out, "--output_dir", directory=True)
    check_run_location(s)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        lock_output_dir(out, script)
    with released_on_error(out, rank0):
        return _start(s, script, unit, keep, out, rank0)


def _start(s: TrainSettings, script: str, unit: str, keep: tuple[str, ...], out: Path, rank0: bool) -> Run | None:
    from transformers.utils import logging

    if rank0:
        clean_interrupted_save(out)
    if final_model_exists(out):
        if rank0:
            print(f"{out} already holds the trained model; nothing to do (remove it to train again)")
            unlock_output_dir(out)
        return None
    if rank0:
        check_only_run_files(out, script, keep)
    logging.disable_progress_bar()  # one bar, ours; not transformers' per-file ones
    d = setup_distributed()
    if d.device.type == "cpu":
        unmap_large_blocks_when_freed()
    check_train_settings(s, d)
    check_tracker(s.wandb_project)
    if d.is_main:
        for tmp in out.glob(".checkpoint-*.tmp"):
            rmtree(tmp)
    if (found := latest_checkpoint(out)) and not s.resume:
        raise UserError(f"{out}: holds {found.name} of an earlier run; pass --resume to continue it, "
                        "or choose another --output_dir")
    checkpoint, state = resume_checkpoint(out, d.is_main)
    torch.manual_seed(s.seed)
    return Run(s, script, unit, d, out, checkpoint, state, keep)


@dataclasses.dataclass
class Run:
    """One training run in output_dir: its plan, resume point, metrics log, checkpoints and final
    save. Rank 0 writes the files; every method is called on every process."""
    s: TrainSettings
    script: str
    unit: str
    d: Dist
    out: Path
    checkpoint: Path | None
    state: dict  # the checkpoint's trainer_state.json
    keep: tuple[str, ...]
    per_epoch: int = 0
    total_steps: int = 0
    start_step: int = 0
    metrics: MetricsLog | None = None
    tracker: Tracker = dataclasses.field(default_factory=Tracker)
    bar: typing.Any = None
    step_began: float = 0.0
    train_began: float = 0.0
    last_row: dict = dataclasses.field(default_factory=dict)
    data_hash: str = ""
    settings: tuple = ()
    stats: dict = dataclasses.field(default_factory=dict)

    def plan(self, *args, **kwargs) -> None:
        with released_on_error(self.out, self.d.is_main):
            self._plan(*args, **kwargs)

    def _plan(self, n_examples: int, stats: dict, data_line: str, *settings, data_hash: str, what: str = "") -> None:
        """Count the steps for `n_examples` usable examples and check that the checkpoint to resume
        from fits them: not past the last step, trained on the same data (`data_hash`, of the rows as
        read). On resume, note the settings that changed. Nothing is written yet (see `resume`)."""
        if self.d.is_main:
            print(data_line)
        self.per_epoch = n_examples // self.s.batch_size
        if self.per_epoch == 0:  # after the data line, which says what was dropped
            raise UserError(f"{self.s.data}: {n_examples} usable examples, fewer than one batch "
                            f"(--batch_size {self.s.batch_size})")
        self.total_steps = self.s.max_steps if self.s.max_steps > 0 else self.s.epochs * self.per_epoch
        if self.checkpoint:
            done, trained_on = self.state.get("step", 0), self.state.get("data_sha256", data_hash)
            if done > self.total_steps:
                raise UserError(f"{self.checkpoint}: at step {done}, past this run's {self.total_steps} steps "
                                f"(--max_steps {self.s.max_steps}, --epochs {self.s.epochs}); raise them to continue, "
                                "or choose another --output_dir")
            if trained_on != data_hash:
                raise UserError(f"{self.s.data}: its rows changed since {self.checkpoint} was trained on them; resume "
                                "with the data it was trained on, or choose another --output_dir")
        self.data_hash, self.settings, self.stats = data_hash, settings, stats
        if self.d.is_main:
            if self.checkpoint:
                note_changed_settings(self.out, {k: v for x in settings for k, v in dataclasses.asdict(x).items()})
            print(f"{self.script}: {what}{self.total_steps} steps of {self.s.batch_size} {self.unit} "
                  f"({self.per_epoch} per epoch) on {self.d.world_size} process(es)")

    def resume(self, policy, optimizer, reference=None) -> None:
        with released_on_error(self.out, self.d.is_main):
            self._resume(policy, optimizer, reference)

    def _resume(self, policy, optimizer, reference=None) -> None:
        """Load the checkpoint to resume from, if any (with the reference, when one changes while
        training); then, the run being sure to start, write data_stats.json and settings.json (a run
        that fails before this leaves the earlier run's as they were) and open metrics.jsonl from the
        resume step on."""
        if self.checkpoint:
            self.start_step = load_checkpoint(self.checkpoint, policy, optimizer, self.d, reference)["step"]
            if self.d.is_main:
                print(f"resuming from {self.checkpoint} (step {self.start_step} of {self.total_steps})")
        if self.d.is_main:
            atomic_write_text(self.out / "data_stats.json", json.dumps(self.stats, indent=1) + "\n")
            save_settings(self.out, *self.settings)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.d, resume_step=self.start_step)
        self.tracker = start_tracker(self.s.wandb_project, self.s.output_dir, dataclasses.asdict(self.s),
                                     self.d.is_main)

    def steps(self, lengths: list[int]):
        """Yield (step, global batch) from the resume point to the end, behind a progress bar on rank 0."""
        from tqdm.auto import tqdm

        s = self.s
        off = {} if self.d.is_main else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE
        self.bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.script, dynamic_ncols=True, **off)
        self.train_began = time.time()
        for step, batch in global_batches(lengths, s.batch_size, s.seed, s.bucket_batches, self.start_step,
                                          self.total_steps):
            if self.d.device.type == "cpu":
                trim_heap()  # the last step's activations are freed by now
            self.step_began = time.time()
            yield step, batch
        self.bar.close()
        self.metrics.close()

    def lr(self, step: int) -> float:
        return lr_at(step, self.s, self.total_steps)

    def check_finite(self, step: int, values: dict[str, float]) -> None:
        """Before optimizer step `step` (from 0): stop with a UserError if a value of it (the loss, the
        gradient norm; the same on every process) is NaN or infinite, since the update would write it
        into the weights. The last checkpoint stays as it is and the final model is not written."""
        name, value = next(((k, v) for k, v in values.items() if not math.isfinite(v)), (None, None))
        if name is None:
            return
        ckpt = latest_checkpoint(self.out)
        last = (f"The last good checkpoint (step {int(ckpt.name[11:])}) is in {ckpt}; resume from it with --resume "
                "and a lower --lr, or check the data" if ckpt else
                "No checkpoint was written yet (see --save_every); lower --lr or check the data")
        with released_on_error(self.out, self.d.is_main):
            raise UserError(f"{self.script}.py: step {step + 1}: {name} is {value}; stopping. {last}")

    def log_step(self, step: int, batch: list[int], values: dict, policy, optimizer, reference=None) -> None:
        """Append step `step`'s metrics row and write a checkpoint every --save_every steps (with the
        reference, when one changes while training)."""
        now = time.time()
        self.last_row = {"step": step + 1, "epoch": (step + 1) / self.per_epoch, **values,
                         f"{self.unit}_per_s": len(batch) / (now - self.step_began), "time": now}
        self.metrics.log(self.last_row)
        self.tracker.log(self.last_row, step=step + 1)
        self.bar.update()
        self.bar.set_postfix(loss=f"{values['loss']:.4f}")
        if self.s.save_every and (step + 1) % self.s.save_every == 0 and step + 1 < self.total_steps:
            save_checkpoint(self.out, step + 1, policy, optimizer, self.d,
                            {"total_steps": self.total_steps, "data_sha256": self.data_hash}, reference)

    def finish(self, policy, tokenizer, summary: dict | None = None) -> None:
        """Write summary.json, then the final model (atomic, carrying the run's small files); unlock."""
        seconds = time.time() - self.train_began
        if self.d.is_main:
            done = self.total_steps - self.start_step
            totals = {"steps": self.total_steps, "steps_this_run": done, "train_start": self.train_began,
                      "train_s": seconds, **(summary or {}),
                      f"{self.unit}_per_s": done * self.s.batch_size / max(seconds, 1e-9),
                      "peak_memory_gib": peak_memory_gib(self.d), "processes": self.d.world_size}
            atomic_write_text(self.out / "summary.json", json.dumps({**totals, "last_step": self.last_row},
                                                                    indent=1) + "\n")
            self.tracker.finish(totals)
        save_final_model(policy, tokenizer, self.out, self.d, keep=(*RUN_FILES, *self.keep))
        if self.d.is_main:
            print(f"saved {self.out}" + (f"; last step: loss {self.last_row['loss']:.4f}" if self.last_row else ""))
            unlock_output_dir(self.out)
        cleanup_distributed()


def note_changed_settings(out_dir: Path, settings: dict) -> None:
    """On resume, print the settings that differ from the ones the run was started with."""
    path = out_dir / "settings.json"
    if not path.exists():
        return
    before = read_json(path)
    changed = [f"{k}: {before[k]!r} -> {v!r}" for k, v in settings.items() if k in before and before[k] != v
               and k != "resume"]
    if changed:
        print(f"note: resuming with changed settings ({'; '.join(changed)})")
