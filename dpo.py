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
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from brevity.batches import micro_batches
from brevity.config import UserError, run_main, setting
from brevity.files import TEXT_OR_CHAT, load_rows, require_input
from brevity.fsdp import clip_grad_norm, set_gradient_sync, wrap_policy
from brevity.logprobs import response_logps
from brevity.models import DTYPES, check_model_dir, compute_dtype, load_model, load_tokenizer, release_memory
from brevity.tokens import collate, encode_prompts, encode_responses, fit_to_length
from brevity.training import TrainSettings, adamw, all_reduce_sums, set_lr, start_training
from losses import LOSSES, loss_hyperparameters

DEFAULT_MODEL, DEFAULT_DATA = "runs/sft", "data/embedded/prefs.jsonl"
PAIR_FIELDS = {"prompt": TEXT_OR_CHAT, "chosen": TEXT_OR_CHAT, "rejected": TEXT_OR_CHAT}
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


def encode_pairs(rows: list[dict], tokenizer, s: Settings) -> tuple[list[tuple], dict]:
    """Tokenize and fit every row to the length limits; return the pairs (prompt ids, chosen ids,
    rejected ids; each response ends with EOS) and what truncation did.
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


def ref_cache_key(pairs: list[tuple], ref_model: str, dtype: str, compute: torch.dtype) -> str:
    h = hashlib.sha256(f"{model_fingerprint(ref_model)}\n{dtype}\n{compute}\n".encode())
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


def reference_logps(pairs: list[tuple], s: Settings, pad_id: int, d) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(ref_logp(chosen) [N], ref_logp(rejected) [N], seconds spent computing them).

    Read from output_dir's cache when its key matches (the tokenized pairs, the reference model's
    files, the dtype and compute dtype), else computed in one no-grad pass with the reference model (--ref_model, or
    the starting policy) and written there. The model is loaded here and released before this
    returns, so it is never in memory beside the policy.
    """
    path, name = Path(s.output_dir) / REF_CACHE, s.ref_model or s.model
    compute = compute_dtype(s.compute_dtype, d.device.type)  # the policy's: equal log-probs at step 0
    key = ref_cache_key(pairs, name, s.dtype, compute)
    if (cached := read_ref_cache(path, key)) is not None:
        return (*cached, 0.0)
    began = time.time()
    reference = wrap_policy(load_model(name, DTYPES[s.dtype], s.trust_remote_code), d, s.chunk_size,
                            compute_dtype=compute)
    batch = 2 * s.batch_size // (d.world_size * s.grad_accum)
    logps = response_logps(reference, [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], batch, pad_id, d)
    del reference
    release_memory()
    chosen, rejected, seconds = logps[:len(pairs)], logps[len(pairs):], time.time() - began
    if d.is_main:
        write_ref_cache(path, key, chosen, rejected)
        print(f"reference log-probs of {len(pairs)} pairs in {seconds:.1f} s, cached in {path}")
    return chosen, rejected, seconds


def accumulate_gradients(policy, pairs: list[tuple], batch: list[int], loss_fn, hyper: dict, ref, s: Settings,
                         pad_id: int, d) -> dict:
    """Forward and backward over this process's micro-batches of the global `batch`; return this
    process's sums of the step's metrics over its pairs. The loss is the mean over the global batch,
    so the gradient is the same for any split into processes and micro-steps (FSDP averages over
    processes, hence the factor)."""
    sums = {}
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
        margin = chosen_rewards - rejected_rewards
        for name, values in {"loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                             "rewards/margin": margin, "rewards/accuracy": margin > 0, "logps/chosen": chosen_logps,
                             "logps/rejected": rejected_logps, "length/chosen": chosen_lengths,
                             "length/rejected": rejected_lengths}.items():
            sums[name] = sums.get(name, 0) + values.detach().float().sum()
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
    if (run := start_training(s, "dpo", unit="pairs")) is None:
        return None
    d = run.d

    tokenizer = load_tokenizer(s.model, s.trust_remote_code)
    pairs, stats = encode_pairs(load_rows(s.data, PAIR_FIELDS), tokenizer, s)
    run.plan(len(pairs), stats, describe(stats, s), s, hyperparameters,
             what=f"loss {s.loss} ({', '.join(f'{k}={v}' for k, v in hyper.items())}); ")
    # before the policy exists (one model in memory at a time) and before a checkpoint is loaded into it
    ref = None if loss.reference_free else reference_logps(pairs, s, tokenizer.pad_token_id, d)

    policy = wrap_policy(load_model(s.model, DTYPES[s.dtype], s.trust_remote_code), d, s.chunk_size,
                         s.activation_checkpointing, compute_dtype(s.compute_dtype, d.device.type))
    optimizer = adamw(policy, s)
    run.resume(policy, optimizer)
    for step, batch in run.steps([len(p) + max(len(c), len(r)) for p, c, r in pairs]):
        lr = set_lr(optimizer, run.lr(step))
        sums = accumulate_gradients(policy, pairs, batch, loss.fn, hyper, ref, s, tokenizer.pad_token_id, d)
        grad_norm = clip_grad_norm(policy, s.max_grad_norm)
        means = {name: total / len(batch) for name, total in all_reduce_sums(d, sums).items()}
        run.check_finite(step, {"loss": means["loss"], "gradient norm": grad_norm})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.log_step(step, batch, {"lr": lr, **means, "grad_norm": grad_norm, "tokens": pair_tokens(pairs, batch)},
                     policy, optimizer)
    run.finish(policy, tokenizer, {"ref_logps_s": 0.0 if ref is None else ref[2]}, keep=(REF_CACHE,))
    return policy.model


if __name__ == "__main__":
    run_main(main, settings_classes)
