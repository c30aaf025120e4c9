"""Supervised fine-tuning: next-token loss on the response tokens of (prompt, response) examples.

    python sft.py --config configs/sft.yaml                          # the embedded default, one process
    torchrun --nproc_per_node 2 sft.py --config configs/sft.yaml     # FSDP2, same steps

The stage: read examples -> tokenize (the prompt once, the response separately + EOS, so the loss
mask is exact) -> train on the mean negative log-likelihood per response token of each global batch
(losses.sft_loss; prompt tokens never count) -> save a Hugging Face directory.
Data: rows with `prompt` and `response` (strings; the prompt may be a list of chat messages), or
`messages` (a chat; the last message is the assistant's response, the ones before are the prompt).
"""
from __future__ import annotations

import dataclasses

import torch

from brevity.batches import micro_batches
from brevity.config import UserError, run_main, setting
from brevity.files import (PROMPT, RESPONSE, chat_problem, check_fields, field_problem, load_rows, require_input,
                           rows_fingerprint)
from brevity.fsdp import clip_grad_norm, set_gradient_sync, wrap_policy
from brevity.models import DTYPES, check_model_dir, compute_dtype, load_model, load_tokenizer
from brevity.tokens import collate, encode_prompts, encode_responses, fit_to_length, padding_id
from brevity.training import TrainSettings, adamw, all_reduce_sums, set_lr, start_training
from losses import sft_loss

DEFAULT_MODEL, DEFAULT_DATA = "data/embedded/init_model", "data/embedded/sft.jsonl"
MAKE_DEFAULTS = "python embedded.py --out_dir data/embedded"


@dataclasses.dataclass
class Settings(TrainSettings):
    model: str = setting(DEFAULT_MODEL, "model to fine-tune: a local Hugging Face directory or a hub id")
    data: str = setting(DEFAULT_DATA, "examples: prompt + response (strings), or messages (a chat ending with the "
                                      "assistant's response); JSONL, a saved dataset or a hub id")
    output_dir: str = setting("runs/sft", TrainSettings.__dataclass_fields__["output_dir"].metadata["help"])
    lr: float = setting(1e-5, "peak learning rate (AdamW)")


def prompt_and_response(row: dict, where: str):
    """(prompt, response) of a row: prompt + response, or the messages of a chat split before its last
    one, the assistant's. What a valid prompt and response are is brevity.files' rule (a blank
    response would teach the model to stop at once)."""
    if "messages" in row:
        if "prompt" in row or "response" in row:
            raise UserError(f"{where}: has messages and also prompt or response; give one or the other")
        messages = row["messages"]
        if problem := field_problem(messages, list) or chat_problem(messages, "assistant"):
            raise UserError(f"{where}: field 'messages' {problem}")
        return messages[:-1], messages[-1]["content"]
    if "prompt" in row and "response" in row:
        check_fields(row, {"prompt": PROMPT, "response": RESPONSE}, where)
        return row["prompt"], row["response"]
    raise UserError(f"{where}: needs prompt and response (strings), or messages (a list of chat messages)")


def encode_examples(rows: list[dict], tokenizer, s: Settings) -> tuple[list[tuple], dict]:
    """Tokenize and fit every row to the length limits; return (prompt ids, response ids) pairs and stats."""
    split = [prompt_and_response(row, f"{s.data}: row {i + 1}") for i, row in enumerate(rows)]
    prompts = encode_prompts(tokenizer, [p for p, _ in split])
    responses = encode_responses(tokenizer, [r for _, r in split])
    examples, stats = [], {"rows": len(rows), "examples": 0, "prompts_cut": 0, "responses_cut": 0,
                           "dropped_too_long": 0}
    for p, r in zip(prompts, responses):
        fit = fit_to_length(p, [r], s.max_length, s.max_prompt_length, s.truncate_responses)
        if fit is None:
            stats["dropped_too_long"] += 1
            continue
        p, (r,), prompt_cut, response_cut = fit
        stats["prompts_cut"] += prompt_cut
        stats["responses_cut"] += response_cut
        examples.append((p, r))
    stats["examples"] = len(examples)
    return examples, stats


def describe(stats: dict, s: Settings) -> str:
    return (f"data: {stats['rows']} rows of {s.data} -> {stats['examples']} examples; {stats['prompts_cut']} prompts "
            f"cut from the left to {s.max_prompt_length} tokens; "
            + (f"{stats['responses_cut']} responses cut at max_length {s.max_length}" if s.truncate_responses else
               f"{stats['dropped_too_long']} examples dropped (the response would pass max_length {s.max_length})"))


def accumulate_gradients(policy, examples: list[tuple], batch: list[int], s: Settings, pad_id: int, d) -> dict:
    """Forward and backward over this process's micro-batches of the global `batch`; return this
    process's sums {"nll": response-token NLLs, "response_tokens": response tokens}.

    The objective is the global batch's mean NLL per response token: each micro-batch's
    `sft_loss` (its own per-token mean) is weighted by its share of the batch's tokens, so the
    gradient is the same for any split into processes and micro-steps (FSDP averages over processes,
    hence the factor world_size)."""
    batch_tokens = sum(len(examples[i][1]) for i in batch)
    sums = {"nll": 0.0, "response_tokens": 0.0}
    micro = micro_batches(batch, d.world_size, d.rank, s.grad_accum)
    for step, ids in enumerate(micro):
        set_gradient_sync(policy, step == len(micro) - 1)
        logps = policy(*collate([examples[i] for i in ids], pad_id, d.device))
        lengths = torch.tensor([len(examples[i][1]) for i in ids], device=d.device)
        loss = sft_loss(policy_logps=logps, lengths=lengths) * (lengths.sum() / batch_tokens) * d.world_size
        loss.backward()
        sums["nll"] = sums["nll"] - logps.detach().sum()
        sums["response_tokens"] = sums["response_tokens"] + lengths.sum()
    return sums


def main(s: Settings) -> torch.nn.Module | None:
    """Train; return the trained model (for tests and notebooks)."""
    require_input(s.model, DEFAULT_MODEL, MAKE_DEFAULTS)
    require_input(s.data, DEFAULT_DATA, MAKE_DEFAULTS)
    check_model_dir(s.model)  # before anything is written
    if (run := start_training(s, "sft", unit="examples")) is None:
        return None
    d = run.d

    tokenizer = load_tokenizer(s.model, s.trust_remote_code)
    rows = load_rows(s.data)
    examples, stats = encode_examples(rows, tokenizer, s)
    run.plan(len(examples), stats, describe(stats, s), s, data_hash=rows_fingerprint(rows))

    policy = wrap_policy(load_model(s.model, DTYPES[s.dtype], s.trust_remote_code), d, s.chunk_size,
                         s.activation_checkpointing, compute_dtype(s.compute_dtype, d.device.type), s.torch_compile)
    optimizer = adamw(policy, s)
    run.resume(policy, optimizer)
    for step, batch in run.steps([len(p) + len(r) for p, r in examples]):
        lr = set_lr(optimizer, run.lr(step))
        sums = accumulate_gradients(policy, examples, batch, s, padding_id(tokenizer), d)
        grad_norm = clip_grad_norm(policy, s.max_grad_norm)
        totals = all_reduce_sums(d, sums)
        loss = totals["nll"] / totals["response_tokens"]
        run.check_finite(step, {"loss": loss, "gradient norm": grad_norm})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.log_step(step, batch, {"lr": lr, "loss": loss, "grad_norm": grad_norm,
                                   "response_tokens": int(totals["response_tokens"]),
                                   "tokens": sum(len(examples[i][0]) + len(examples[i][1]) for i in batch)},
                     policy, optimizer)
    run.finish(policy, tokenizer)
    return policy.model


if __name__ == "__main__":
    run_main(main, (Settings,))
