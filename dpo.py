"""Preference optimisation on (prompt, chosen, rejected) pairs: DPO, iLR-DPO and every loss in losses.py.

    python dpo.py --config configs/dpo.yaml --loss ilrdpo --alpha 0.4           # one process
    torchrun --nproc_per_node 2 dpo.py --config configs/dpo.yaml --loss dpo     # FSDP2, same steps

The stage: read pairs -> tokenize (the prompt once, each response separately, so the response mask
is exact) -> reference log-probs in one pass before training, cached in output_dir (the reference
model is never in memory beside the policy; reference-free losses skip it) -> train (chosen and
rejected through the model in one forward, length-bucketed batches, dropout off) -> save a Hugging
Face directory. `--loss NAME` picks the objective and its hyperparameters become flags with that
loss's defaults (`--beta`, `--alpha`, ...); a hyperparameter the loss does not have is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from common import (DTYPES, TEXT_OR_CHAT, MetricsLog, TrainSettings, UserError, all_reduce_sum, atomic_write_text,
                    check_model_dir, cleanup_distributed, clip_grad_norm, collate, count_steps, encode_prompts,
                    encode_responses, fit_to_length, global_batches, load_checkpoint, load_model, load_rows,
                    load_tokenizer, lr_at, micro_batches, note_changed_settings, peak_memory_gib, progress,
                    require_input, reshard, run_main, save_checkpoint, save_final_model, save_settings,
                    set_gradient_sync, setting, start_training, stop_if_not_finite, wrap_policy)
from losses import LOSSES, loss_hyperparameters

DEFAULT_MODEL, DEFAULT_DATA = "runs/sft", "data/embedded/prefs.jsonl"
PAIR_FIELDS = {"prompt": TEXT_OR_CHAT, "chosen": TEXT_OR_CHAT, "rejected": TEXT_OR_CHAT}
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
           "logps/chosen", "logps/rejected", "length/chosen", "length/rejected")  # means over the batch's pairs
REF_CACHE = "ref_logps.safetensors"


@dataclasses.dataclass
class Settings(TrainSettings):
    model: str = setting(DEFAULT_MODEL, "policy to start from (and the reference, unless --ref_model)")
    data: str = setting(DEFAULT_DATA, "pairs with prompt, chosen, rejected: strings, or chat messages as in "
                                      "TRL's preference format (UltraFeedback-style data works as it is)")
    output_dir: str = setting("runs/dpo", TrainSettings.__dataclass_fields__["output_dir"].metadata["help"])
    loss: str = setting("ilrdpo", f"preference loss: {', '.join(LOSSES)}; its hyperparameters become flags")
    ref_model: str = setting("", "reference model (same tokenizer); empty: the starting policy, --model")
    lr: float = setting(5e-7, "peak learning rate (AdamW); 5e-7 is the 3D-properties paper's DPO setting")
    warmup_steps: int = setting(10, "linear warm-up steps")


def loss_settings(name: str) -> type:
    """LOSSES[name]'s hyperparameters as a dataclass, so that they parse as flags (--beta 0.1)."""
    fields = [(k, float, setting(v, f"hyperparameter of the {name} loss (see losses.{LOSSES[name].fn.__name__})"))
              for k, v in loss_hyperparameters(name).items()]
    return dataclasses.make_dataclass(f"{name}_hyperparameters", fields)


def settings_classes(argv: list[str]) -> tuple[type, type]:
    """(Settings, the loss's hyperparameters): the loss comes from --loss, else --config, else the default."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--loss")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    name = known.loss
    if name is None and known.config:
        import yaml

        try:
            name = (yaml.safe_load(Path(known.config).read_text(encoding="utf-8")) or {}).get("loss")
        except (OSError, yaml.YAMLError, AttributeError):
            pass  # parse_settings reports a bad config file properly
    name = name or Settings.loss
    if name not in LOSSES:
        raise UserError(f"unknown --loss {name!r}; known: {', '.join(LOSSES)}")
    own = loss_hyperparameters(name)
    others = {h for n in LOSSES for h in loss_hyperparameters(n)} - set(own)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag[2:] in others:
            raise UserError(f"{flag} is not a hyperparameter of loss {name!r} "
                            f"(it has: {', '.join('--' + h for h in own) or 'none'})")
    return Settings, loss_settings(name)


# ---------------------------------------------------------------------------------------------
# Data: a pair is (prompt ids, chosen ids, rejected ids); each response ends with EOS.

def encode_pairs(rows: list[dict], tokenizer, s: Settings) -> tuple[list[tuple], dict]:
    """Tokenize and fit every row to the length limits; return the pairs and what truncation did.
    A pair whose chosen and rejected responses are the same tokens is dropped (and counted): every
    preference loss's pairwise term has zero gradient on it."""
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    chosen = encode_responses(tokenizer, [r["chosen"] for r in rows])
    rejected = encode_responses(tokenizer, [r["rejected"] for r in rows])
    pairs, stats = [], {"rows": len(rows), "pairs": 0, "prompts_cut": 0, "responses_cut": 0, "dropped_too_long": 0,
                        "dropped_identical": 0}
    for p, c, r in zip(prompts, chosen, rejected):
        if c == r:
            stats["dropped_identical"] += 1
            continue
        fit = fit_to_length(p, [c, r], s.max_length, s.max_prompt_length, s.truncate_responses)
        if fit is None:
            stats["dropped_too_long"] += 1
            continue
        p, (c, r), prompt_cut, responses_cut = fit
        stats["prompts_cut"] += prompt_cut
        stats["responses_cut"] += responses_cut
        pairs.append((p, c, r))
    stats["pairs"] = len(pairs)
    return pairs, stats


def describe(stats: dict, s: Settings) -> str:
    return (f"data: {stats['rows']} rows of {s.data} -> {stats['pairs']} pairs; {stats['dropped_identical']} pairs "
            f"dropped (chosen identical to rejected); {stats['prompts_cut']} prompts cut "
            f"from the left to {s.max_prompt_length} tokens; "
            + (f"{stats['responses_cut']} pairs with a response cut at max_length {s.max_length}"
               if s.truncate_responses else
               f"{stats['dropped_too_long']} pairs dropped (a response would pass max_length {s.max_length})"))


def pair_tokens(pairs: list[tuple], batch: list[int]) -> int:
    """Non-pad tokens of the chosen and rejected sequences of a batch."""
    return sum(2 * len(pairs[i][0]) + len(pairs[i][1]) + len(pairs[i][2]) for i in batch)


# ---------------------------------------------------------------------------------------------
# Reference log-probs: one no-grad pass before training, cached in output_dir under a key that
# changes with the tokenized pairs (data, tokenizer, chat template, length limits), the reference
# model's files and the dtype.

def model_fingerprint(path: str) -> str:
    """config.json and the name, size and mtime of each weights file; a hub id stands for itself."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = [(p / "config.json").read_text(encoding="utf-8") if (p / "config.json").exists() else ""]
    for f in sorted(p.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def ref_cache_key(pairs: list[tuple], ref_model: str, dtype: str) -> str:
    h = hashlib.sha256(f"{model_fingerprint(ref_model)}\n{dtype}\n".encode())
    for p, c, r in pairs:
        h.update(json.dumps([p, c, r], separators=(",", ":")).encode())
    return h.hexdigest()


def read_ref_cache(path: Path, key: str):
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        return f.get_tensor("chosen"), f.get_tensor("rejected")


def write_ref_cache(path: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)


@torch.no_grad()
def response_logps(model, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, d) -> torch.Tensor:
    """logp(response | prompt) of every (prompt, response), float32 [N] on CPU, on every process.

    Length-sorted batches of `batch_size` sequences per process; under FSDP every process must run
    every forward, so one without a share of the last group recomputes an example of it.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    total, count = torch.zeros(len(examples)), torch.zeros(len(examples))
    group = batch_size * d.world_size
    for start in range(0, len(order), group):
        ids = order[start:start + group][d.rank * batch_size:(d.rank + 1) * batch_size] or order[start:start + 1]
        logps = model(*collate([examples[i] for i in ids], pad_id, d.device)).float().cpu()
        total[ids] += logps
        count[ids] += 1
    reshard(model)
    return all_reduce_sum(d, total.to(d.device)).cpu() / all_reduce_sum(d, count.to(d.device)).cpu()


def reference_logps(model, pairs: list[tuple], s: Settings, pad_id: int, d) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_logp(chosen), ref_logp(rejected)), each [N], computed with `model` and cached."""
    batch = 2 * s.batch_size // (d.world_size * s.grad_accum)
    logps = response_logps(model, [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], batch, pad_id, d)
    return logps[:len(pairs)], logps[len(pairs):]


# ---------------------------------------------------------------------------------------------
# One optimizer step's forward and backward.

def accumulate_gradients(policy, pairs: list[tuple], batch: list[int], loss_fn, hyper: dict, ref, s: Settings,
                         pad_id: int, d) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of the global `batch`; return the sums of
    METRICS over its pairs. The loss is the mean over the global batch, so the gradient is the same
    for any split into processes and micro-steps (FSDP averages over processes, hence the factor)."""
    sums = torch.zeros(len(METRICS))
    micro = micro_batches(batch, d.world_size, d.rank, s.grad_accum)
    for step, ids in enumerate(micro):
        set_gradient_sync(policy, step == len(micro) - 1)
        examples = [(pairs[i][0], pairs[i][1]) for i in ids] + [(pairs[i][0], pairs[i][2]) for i in ids]
        logps = policy(*collate(examples, pad_id, d.device))  # chosen then rejected: one forward
        chosen_logps, rejected_logps = logps.split(len(ids))
        chosen_lengths = torch.tensor([len(pairs[i][1]) for i in ids], device=d.device)
        rejected_lengths = torch.tensor([len(pairs[i][2]) for i in ids], device=d.device)
        losses, chosen_rewards, rejected_rewards = loss_fn(
            policy_chosen_logps=chosen_logps, policy_rejected_logps=rejected_logps,
            reference_chosen_logps=None if ref is None else ref[0][ids].to(d.device),
            reference_rejected_logps=None if ref is None else ref[1][ids].to(d.device),
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **hyper)
        (losses.sum() * d.world_size / len(batch)).backward()
        with torch.no_grad():
            margin = chosen_rewards - rejected_rewards
            sums += torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(), margin.sum(),
                                 (margin > 0).float().sum(), chosen_logps.sum(), rejected_logps.sum(),
                                 chosen_lengths.sum().float(), rejected_lengths.sum().float()]).float().cpu()
    return sums


def main(s: Settings, hyperparameters) -> torch.nn.Module | None:
    """Train; return the trained model (for tests and notebooks)."""
    require_input(s.data, DEFAULT_DATA, "python embedded.py --out_dir data/embedded")
    require_input(s.model, DEFAULT_MODEL, "python sft.py --config configs/sft.yaml")
    for model in (s.model, s.ref_model):  # before anything is written
        if model:
            check_model_dir(model)
    if s.loss not in LOSSES:
        raise UserError(f"unknown --loss {s.loss!r}; known: {', '.join(LOSSES)}")
    loss, hyper = LOSSES[s.loss], dataclasses.asdict(hyperparameters)
    if set(hyper) != set(loss_hyperparameters(s.loss)):
        raise UserError(f"loss {s.loss!r} takes {sorted(loss_hyperparameters(s.loss))}, got {sorted(hyper)}")
    out = Path(s.output_dir)
    if (started := start_training(s)) is None:
        return None
    d, checkpoint = started

    # Data
    tokenizer = load_tokenizer(s.model, s.trust_remote_code)
    pairs, stats = encode_pairs(load_rows(s.data, PAIR_FIELDS), tokenizer, s)
    if d.is_main:
        print(describe(stats, s))
    per_epoch, total_steps = count_steps(len(pairs), s)  # after the data line, which says what was dropped
    if d.is_main:
        if checkpoint:
            note_changed_settings(out, {**dataclasses.asdict(s), **hyper}, d)
        atomic_write_text(out / "data_stats.json", json.dumps(stats, indent=1) + "\n")
        save_settings(out, s, hyperparameters)
        print(f"dpo: loss {s.loss} ({', '.join(f'{k}={v}' for k, v in hyper.items())}); {total_steps} steps of "
              f"{s.batch_size} pairs ({per_epoch} per epoch) on {d.world_size} process(es)")

    # Reference log-probs, before the policy trains (and before a checkpoint is loaded into it)
    ref, ref_computed, began = None, False, time.time()
    if not loss.reference_free:
        key = ref_cache_key(pairs, s.ref_model or s.model, s.dtype)
        ref = read_ref_cache(out / REF_CACHE, key)
        if ref is None and s.ref_model and s.ref_model != s.model:
            reference = wrap_policy(load_model(s.ref_model, DTYPES[s.dtype], s.trust_remote_code), d, s.chunk_size)
            ref, ref_computed = reference_logps(reference, pairs, s, tokenizer.pad_token_id, d), True
            del reference
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    policy = wrap_policy(load_model(s.model, DTYPES[s.dtype], s.trust_remote_code), d, s.chunk_size,
                         s.activation_checkpointing)
    if not loss.reference_free and ref is None:  # the reference is the starting policy
        ref, ref_computed = reference_logps(policy, pairs, s, tokenizer.pad_token_id, d), True
    ref_seconds = time.time() - began if ref_computed else 0.0
    if ref_computed and d.is_main:
        write_ref_cache(out / REF_CACHE, key, *ref)
        print(f"reference log-probs of {len(pairs)} pairs in {ref_seconds:.1f} s, cached in {out / REF_CACHE}")

    # Train
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    start = load_checkpoint(checkpoint, policy, optimizer, d)["step"] if checkpoint else 0
    if checkpoint and d.is_main:
        print(f"resuming from {checkpoint} (step {start} of {total_steps})")
    metrics = MetricsLog(out / "metrics.jsonl", d, resume_step=start)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in pairs]
    bar = progress(global_batches(lengths, s, start, total_steps), d, total_steps, start, "dpo")
    row, train_start = {}, time.time()
    for step, batch in bar:
        began = time.time()
        lr = lr_at(step, s, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = accumulate_gradients(policy, pairs, batch, loss.fn, hyper, ref, s, tokenizer.pad_token_id, d)
        grad_norm = clip_grad_norm(policy, s.max_grad_norm)
        means = all_reduce_sum(d, sums.to(d.device)).cpu() / len(batch)
        stop_if_not_finite("dpo.py", step + 1, {"loss": float(means[0]), "gradient norm": grad_norm}, out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.time()
        row = {"step": step + 1, "epoch": (step + 1) / per_epoch, "lr": lr, **dict(zip(METRICS, means.tolist())),
               "grad_norm": grad_norm, "tokens": pair_tokens(pairs, batch), "pairs_per_s": len(batch) / (now - began),
               "time": now}
        metrics.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}")
        if s.save_every and (step + 1) % s.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(out, step + 1, policy, optimizer, d, {"total_steps": total_steps})
    bar.close()
    metrics.close()
    train_seconds = time.time() - train_start
    if d.is_main:
        atomic_write_text(out / "summary.json", json.dumps({
            "steps": total_steps, "steps_this_run": total_steps - start, "train_start": train_start,
            "train_s": train_seconds, "ref_logps_s": ref_seconds,
            "pairs_per_s": (total_steps - start) * s.batch_size / max(train_seconds, 1e-9),
            "peak_memory_gib": peak_memory_gib(d), "processes": d.world_size, "last_step": row}, indent=1) + "\n")

    save_final_model(policy, tokenizer, out, d,
                     keep=("settings.json", "metrics.jsonl", "data_stats.json", "summary.json", REF_CACHE))
    if d.is_main:
        last = f"; last step: loss {row['loss']:.4f}, accuracy {row['rewards/accuracy']:.2f}" if row else ""
        print(f"saved {out}{last}")
    cleanup_distributed()
    return policy.model


if __name__ == "__main__":
    run_main(main, settings_classes)
