"""Preference optimisation on (prompt, chosen, rejected) pairs: DPO, iLR-DPO and every loss in losses.py.

    python dpo.py --config configs/dpo.yaml --loss ilrdpo --alpha 0.4           # one process
    torchrun --nproc_per_node 2 dpo.py --config configs/dpo.yaml --loss dpo     # FSDP2, same steps
    python dpo.py --loss sigmoid+bco_pair+sft --loss_weights 0.8,0.2,1.0        # a mixture (MPO)
    python dpo.py --loss dpo --ld_alpha 0.5                                     # LD-DPO; --sampo, --use_weighting

The stage: read pairs -> tokenize (the prompt once, each response separately, so the response mask
is exact) -> reference log-probs in one pass before training, cached in output_dir (the reference
model is never in memory beside the policy; reference-free losses skip it) -> train (a pair is one
row, prompt + chosen + rejected, so the prompt goes through the model once for both; length-bucketed
batches, dropout off) -> save a Hugging Face directory. `--loss NAME` picks the objective (`a+b`: their weighted sum, each part logged as
loss/NAME) and its hyperparameters become flags with that loss's defaults (`--beta`, `--alpha`, ...);
a hyperparameter the loss does not have is an error. The options of losses.Objective are flags too:
with LD-DPO or SamPO the policy and the cached reference log-probs are per token, with WPO the policy
also gives log sum_v p_v^2 per token. `--sync_ref_model` (TR-DPO) keeps the reference in memory instead,
and every --ref_model_sync_steps steps moves it to alpha * policy + (1 - alpha) * reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
import typing
from pathlib import Path

import torch

from brevity.batches import micro_batches
from brevity.config import UserError, read_yaml, run_main, setting
from brevity.files import PROMPT, RESPONSE, load_rows, require_input, respect_umask, rows_fingerprint
from brevity.fsdp import clip_grad_norm, set_gradient_sync, wrap_policy
from brevity.logprobs import response_logps
from brevity.generation import response_seed
from brevity.models import (DTYPES, check_model_dir, check_same_vocabulary, compute_dtype, load_model, load_tokenizer,
                            model_fingerprint, release_memory, safetensors_problem, sliding_window_below, text_config)
from brevity.tokens import (collate, collate_pairs, encode_prompts, encode_responses, fit_to_length, padding_id,
                            vocab_sha256)
from brevity.training import TrainSettings, adamw, all_reduce_sums, set_lr, start_training
from losses import LOSSES, Objective, Term, loss_hyperparameters, objective_losses

DEFAULT_MODEL, DEFAULT_DATA = "runs/sft", "data/embedded/prefs.jsonl"
PAIR_FIELDS = {"prompt": PROMPT, "chosen": RESPONSE, "rejected": RESPONSE}
REF_CACHE = "ref_logps.safetensors"


@dataclasses.dataclass
class Settings(TrainSettings):
    model: str = setting(DEFAULT_MODEL, "policy to start from (and the reference, unless --ref_model)")
    data: str = setting(DEFAULT_DATA, "pairs with prompt, chosen, rejected: strings, or chat messages as in "
                                      "TRL's preference format (UltraFeedback-style data works as it is)")
    output_dir: str = setting("runs/dpo", TrainSettings.__dataclass_fields__["output_dir"].metadata["help"])
    loss: str = setting("ilrdpo", f"preference loss: {', '.join(LOSSES)}; several joined by + are their weighted "
                                  "sum; its hyperparameters become flags")
    loss_weights: str = setting("", "the weights of a + mixture, comma-separated in its order (MPO: 0.8,0.2,1.0); "
                                    "empty: 1 each")
    ld_alpha: float = setting(1.0, "LD-DPO: the weight of the tokens past the shorter response's length, policy "
                                   "and reference alike; 1: plain sums (off)")
    sampo: bool = setting(False, "SamPO: sum the longer response over a random subset of as many tokens as the "
                                 "shorter has (drawn from --seed, the pair and the step)")
    use_weighting: bool = setting(False, "WPO: weight each pair by the policy's aligned likelihood of both responses")
    f_divergence: typing.Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = setting(
        "reverse_kl", "f-DPO: the divergence from the reference; reverse_kl is DPO's")
    f_alpha_divergence_coef: float = setting(0.5, "alpha of --f_divergence alpha_divergence")
    ref_model: str = setting("", "reference model (same tokenizer); empty: the starting policy, --model")
    sync_ref_model: bool = setting(False, "TR-DPO: keep the reference in memory beside the policy (no cache) and "
                                          "move it to alpha * policy + (1 - alpha) * reference every tau steps")
    ref_model_mixup_alpha: float = setting(0.6, "TR-DPO's alpha (TRL's default)")
    ref_model_sync_steps: int = setting(512, "TR-DPO's tau: steps between reference updates (TRL's default)")
    lr: float = setting(5e-7, "peak learning rate (AdamW); 5e-7 is the 3D-properties paper's DPO setting")
    warmup_steps: int = setting(10, "linear warm-up steps")
    shared_prompt: bool = setting(True, "a pair as one row, prompt + chosen + rejected, the prompt computed once for "
                                        "both (a [B, T, T] mask keeps the responses apart); false: two sequences")


def loss_settings(loss: str) -> type:
    """The hyperparameters of the losses in `loss` ("a+b" for a mixture) as a dataclass, so that they parse
    as flags (--beta 0.1). A name several losses share is one flag, for all of them; where their defaults
    differ it has none, so it must be given."""
    defaults: dict[str, dict[str, float]] = {}
    for name in loss.split("+"):
        for k, v in loss_hyperparameters(name).items():
            defaults.setdefault(k, {})[name] = v
    fields = []
    for k, by_loss in defaults.items():
        where = ", ".join(f"{n} (see losses.{LOSSES[n].fn.__name__})" for n in by_loss)
        if len(set(by_loss.values())) == 1:
            fields.append((k, float, setting(next(iter(by_loss.values())), f"hyperparameter of {where}")))
        else:
            fields.insert(0, (k, float, dataclasses.field(metadata={
                "help": f"hyperparameter of {where}, whose defaults differ ({sorted(set(by_loss.values()))}): give it"})))
    return dataclasses.make_dataclass(f"{loss.replace('+', '_')}_hyperparameters", fields)


def settings_classes(argv: list[str]) -> tuple[type, type]:
    """(Settings, the loss's hyperparameters): the loss comes from --loss, else --config, else the default."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--loss")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    name = known.loss
    if name is None and known.config and isinstance(config := read_yaml(known.config), dict):
        name = config.get("loss")  # a config that is not a mapping: parse_settings says so
    name = name if isinstance(name, str) and name else Settings.loss  # a mistyped config value: parse_settings says so
    for part in name.split("+"):
        if part not in LOSSES:
            raise UserError(f"unknown --loss {part!r}; known: {', '.join(LOSSES)}")
    own = {h: None for part in name.split("+") for h in loss_hyperparameters(part)}
    others = {h for n in LOSSES for h in loss_hyperparameters(n)} - set(own)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag[2:] in others:
            raise UserError(f"{flag} is not a hyperparameter of loss {name!r} "
                            f"(it has: {', '.join('--' + h for h in own) or 'none'})")
    return Settings, loss_settings(name)


def build_objective(s: Settings, hyperparameters) -> Objective:
    """The losses.Objective that --loss, --loss_weights, the loss hyperparameters and the options describe;
    a UserError naming what is wrong, before anything is written."""
    names, hyper = s.loss.split("+"), dataclasses.asdict(hyperparameters)
    try:
        weights = [float(w) for w in s.loss_weights.split(",")] if s.loss_weights else [1.0] * len(names)
    except ValueError:
        raise UserError(f"--loss_weights {s.loss_weights!r}: comma-separated numbers, one per loss of --loss")
    if len(weights) != len(names):
        raise UserError(f"--loss_weights {s.loss_weights!r}: {len(weights)} weights for the {len(names)} losses of "
                        f"--loss {s.loss}")
    if set(hyper) != {h for n in names if n in LOSSES for h in loss_hyperparameters(n)}:
        raise UserError(f"loss {s.loss!r} does not take the hyperparameters {sorted(hyper)}")
    if s.sync_ref_model and not (0 <= s.ref_model_mixup_alpha <= 1 and s.ref_model_sync_steps >= 1):
        raise UserError(f"--ref_model_mixup_alpha {s.ref_model_mixup_alpha} must be in [0, 1] and "
                        f"--ref_model_sync_steps {s.ref_model_sync_steps} >= 1")
    try:
        objective = Objective(
            tuple(Term(n, w, {k: hyper[k] for k in loss_hyperparameters(n)}) for n, w in zip(names, weights)),
            ld_alpha=None if s.ld_alpha == 1 else s.ld_alpha, sampo=s.sampo, use_weighting=s.use_weighting,
            f_divergence=s.f_divergence, f_alpha_divergence_coef=s.f_alpha_divergence_coef)
    except ValueError as e:
        raise UserError(f"--loss {s.loss}: {e}")
    if s.sync_ref_model and "reference" not in objective.needs:
        raise UserError(f"--sync_ref_model: loss {s.loss} is reference-free; there is no reference to sync")
    return objective


def describe_objective(s: Settings, hyperparameters) -> str:
    options = [f"ld_alpha {s.ld_alpha}" if s.ld_alpha != 1 else "", "SamPO" if s.sampo else "",
               "WPO weighting" if s.use_weighting else "",
               f"f-divergence {s.f_divergence}" if s.f_divergence != "reverse_kl" else "",
               f"TR-DPO (alpha {s.ref_model_mixup_alpha}, tau {s.ref_model_sync_steps})" if s.sync_ref_model else ""]
    hyper = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(hyperparameters).items())
    weights = f" weights {s.loss_weights}" if s.loss_weights else ""
    return f"loss {s.loss}{weights} ({hyper}){''.join('; ' + o for o in options if o)}; "


def response_ids(rows: list[dict], tokenizer, path: str,
                 vocab_size: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(chosen ids, rejected ids, how many pairs kept their sampled ids). A pair that carries the token ids
    it was sampled as (label.py's "chosen_token_ids", "rejected_token_ids") under this tokenizer's
    vocabulary ("vocab_sha256") is trained on those very ids, the ones its lengths count: re-encoding the
    text can give other tokens (a sampler need not emit the tokenizer's own segmentation). Any other pair
    is encoded from its text, ending with the template's end of turn. Sampled ids must be below
    `vocab_size`, the model's."""
    chosen = encode_responses(tokenizer, [r["chosen"] for r in rows])
    rejected = encode_responses(tokenizer, [r["rejected"] for r in rows])
    vocab, sampled = vocab_sha256(tokenizer), 0
    for i, row in enumerate(rows):
        if row.get("vocab_sha256") != vocab or "chosen_token_ids" not in row or "rejected_token_ids" not in row:
            continue
        for key in ("chosen_token_ids", "rejected_token_ids"):
            ids = row[key]
            if not (isinstance(ids, list) and ids and all(isinstance(t, int) and 0 <= t < vocab_size for t in ids)):
                raise UserError(f"{path}: row {i + 1}: {key} must be a non-empty list of token ids below {vocab_size}")
        chosen[i], rejected[i], sampled = row["chosen_token_ids"], row["rejected_token_ids"], sampled + 1
    return chosen, rejected, sampled


def encode_pairs(rows: list[dict], tokenizer, s: Settings, vocab_size: int = 0) -> tuple[list[tuple], dict]:
    """Tokenize and fit every row to the length limits; return the pairs (prompt ids, chosen ids,
    rejected ids; each response ends with its end of turn, `response_ids`) and what truncation did.
    `vocab_size` bounds sampled ids: the model's (`model_vocab_size`); 0: the tokenizer's length.
    A pair whose chosen and rejected responses are the same tokens is dropped (and counted): every
    preference loss's pairwise term has zero gradient on it."""
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    chosen, rejected, sampled = response_ids(rows, tokenizer, s.data, vocab_size or len(tokenizer))
    pairs, stats = [], {"rows": len(rows), "pairs": 0, "prompts_cut": 0, "responses_cut": 0, "dropped_too_long": 0,
                        "dropped_identical": 0, "sampled_token_ids": sampled}
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
    return (f"data: {stats['rows']} rows of {s.data} -> {stats['pairs']} pairs ({stats['sampled_token_ids']} rows "
            f"trained on their sampled token ids); {stats['dropped_identical']} pairs "
            f"dropped (chosen identical to rejected); {stats['prompts_cut']} prompts cut "
            f"from the left to {s.max_prompt_length} tokens; "
            + (f"{stats['responses_cut']} pairs with a response cut at max_length {s.max_length}"
               if s.truncate_responses else
               f"{stats['dropped_too_long']} pairs dropped (a response would pass max_length {s.max_length})"))


def shared_prompt_setting(s: Settings, configs: list) -> Settings:
    """`s`, with --shared_prompt off (and a line saying why) where a model's sliding attention window is
    shorter than --max_length: the pair's own mask would replace the window the model masks with."""
    windows = [w for w in (sliding_window_below(c, s.max_length) for c in configs) if w]
    if not (s.shared_prompt and windows):
        return s
    print(f"--shared_prompt off: the model attends within a window of {windows[0]} tokens, less than "
          f"--max_length {s.max_length}; chosen and rejected go through it as two sequences")
    return dataclasses.replace(s, shared_prompt=False)


def row_lengths(pairs: list[tuple], shared_prompt: bool) -> list[int]:
    """What each pair pads its batch to, the key of the length buckets: prompt + chosen + rejected in
    one row, or prompt + the longer response in two."""
    return [len(p) + (len(c) + len(r) if shared_prompt else max(len(c), len(r))) for p, c, r in pairs]


def pair_tokens(pairs: list[tuple], batch: list[int], shared_prompt: bool = False) -> int:
    """Non-pad tokens of the chosen and rejected sequences of a batch; with `shared_prompt`, those the
    model computes (each prompt once)."""
    return sum((1 if shared_prompt else 2) * len(pairs[i][0]) + len(pairs[i][1]) + len(pairs[i][2]) for i in batch)


def ref_cache_key(pairs: list[tuple], ref_model: str, dtype: str, compute: torch.dtype, per_token: bool = False,
                  shared_prompt: bool = True) -> str:
    """Changes with the tokenized pairs, the reference model's files, the dtype, the compute dtype, what
    is cached (sums per response, or the log-prob of every token) and the rows it was computed in (a
    pair per row or a sequence per row: the same values up to rounding, but the policy's first step
    should see its own), so a cache of another kind is a miss."""
    layout = ("per-token" if per_token else "sums") + (" shared-prompt" if shared_prompt else "")
    h = hashlib.sha256(f"{model_fingerprint(ref_model)}\n{dtype}\n{compute}\n{layout}\n".encode())
    for p, c, r in pairs:
        h.update(json.dumps([p, c, r], separators=(",", ":")).encode())
    return h.hexdigest()


def read_ref_cache(path: Path, key: str):
    """The cached (chosen, rejected) reference log-probs if their key is `key`; else, or if the file
    is damaged (a copy cut short), None: a cache miss, computed again."""
    from safetensors import safe_open

    if not path.exists() or safetensors_problem(path):
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        return f.get_tensor("chosen"), f.get_tensor("rejected")


def write_ref_cache(path: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp), metadata={"key": key})
    respect_umask(tmp)
    os.replace(tmp, path)


def reference_logps(pairs: list[tuple], s: Settings, pad_id: int, d,
                    per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(ref_logp(chosen), ref_logp(rejected), seconds spent computing them): each [N], or with `per_token`
    the log-prob of every response token, [sum of the lengths], pair after pair.

    Read from output_dir's cache when its key matches (`ref_cache_key`), else computed in one no-grad
    pass with the reference model (--ref_model, or the starting policy) and written there. The model
    is loaded here and released before this returns, so it is never in memory beside the policy.
    """
    path, name = Path(s.output_dir) / REF_CACHE, s.ref_model or s.model
    compute = compute_dtype(s.compute_dtype, d.device.type)  # the policy's: equal log-probs at step 0
    key = ref_cache_key(pairs, name, s.dtype, compute, per_token, s.shared_prompt)
    if (cached := read_ref_cache(path, key)) is not None:
        return (*cached, 0.0)
    began = time.time()
    reference = wrap_policy(load_model(name, DTYPES[s.dtype], s.trust_remote_code), d, s.chunk_size,
                            compute_dtype=compute)
    micro = s.batch_size // (d.world_size * s.grad_accum)  # the policy's rows: a pair, or its two sequences
    examples, rows = ((pairs, micro) if s.shared_prompt else
                      ([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], 2 * micro))
    logps = response_logps(reference, examples, rows, pad_id, d, per_token)
    del reference
    release_memory()
    split = sum(len(c) for _, c, _ in pairs) if per_token else len(pairs)
    chosen, rejected, seconds = logps[:split], logps[split:], time.time() - began
    if d.is_main:
        write_ref_cache(path, key, chosen, rejected)
        print(f"reference log-probs of {len(pairs)} pairs{' per token' if per_token else ''} in {seconds:.1f} s, "
              f"cached in {path}")
    return chosen, rejected, seconds


def cached_reference(ref: tuple, pairs: list[tuple], per_token: bool):
    """fn(ids, width) -> the cached reference log-probs of pairs `ids`: ([n], [n]) sums, or per token
    ([n, width], [n, width]) with zeros past each response."""
    def starts(side):
        lengths = torch.tensor([len(pair[side]) for pair in pairs])
        return torch.cumsum(lengths, 0) - lengths

    chosen_starts, rejected_starts = (starts(1), starts(2)) if per_token else (None, None)

    def rows(flat, first, side, ids, width):
        out = torch.zeros(len(ids), width)
        for row, i in enumerate(ids):
            out[row, :len(pairs[i][side])] = flat[first[i]:first[i] + len(pairs[i][side])]
        return out

    def lookup(ids, width):
        if not per_token:
            return ref[0][ids], ref[1][ids]
        return rows(ref[0], chosen_starts, 1, ids, width), rows(ref[1], rejected_starts, 2, ids, width)
    return lookup


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """TR-DPO, Gorbatovski et al. 2024 (arXiv 2404.09656), soft update: pi_ref <- alpha * pi + (1 - alpha) * pi_ref,
    parameter by parameter (shard by shard under FSDP2, where both are sharded alike)."""
    for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_param.mul_(1 - alpha).add_(param, alpha=alpha)


def accumulate_gradients(policy, pairs: list[tuple], batch: list[int], step: int, objective: Objective, reference,
                         s: Settings, pad_id: int, d) -> dict:
    """Forward and backward over this process's micro-batches of the global `batch`; return this
    process's sums of the step's metrics over its pairs. The loss is the mean over the global batch,
    so the gradient is the same for any split into processes and micro-steps (FSDP averages over
    processes, hence the factor). `reference` is None (reference-free), a cache lookup
    (`cached_reference`) or the live reference model (--sync_ref_model)."""
    needs, sums = objective.needs, {}
    per_token, sum_sq = "policy_tokens" in needs, "log_sum_sq_probs" in needs
    micro = micro_batches(batch, d.world_size, d.rank, s.grad_accum)
    for micro_step, ids in enumerate(micro):
        set_gradient_sync(policy, micro_step == len(micro) - 1)
        inputs = ([collate_pairs([pairs[i] for i in ids], pad_id, d.device)] if s.shared_prompt else
                  collate([(pairs[i][0], pairs[i][1]) for i in ids] + [(pairs[i][0], pairs[i][2]) for i in ids],
                          pad_id, d.device))
        out = policy(*inputs, per_token=per_token, sum_sq=sum_sq)  # chosen then rejected: one forward
        logps, log_sum_sq = out if sum_sq else (out, None)
        tensors = {"policy_chosen_logps": logps[:len(ids)], "policy_rejected_logps": logps[len(ids):],
                   "chosen_lengths": torch.tensor([len(pairs[i][1]) for i in ids], device=d.device),
                   "rejected_lengths": torch.tensor([len(pairs[i][2]) for i in ids], device=d.device)}
        if sum_sq:
            tensors |= {"policy_chosen_log_sum_sq_probs": log_sum_sq[:len(ids)],
                        "policy_rejected_log_sum_sq_probs": log_sum_sq[len(ids):]}
        if "pair_seeds" in needs:  # SamPO's draw: a function of (seed, pair, step), whatever the batch split
            tensors["pair_seeds"] = torch.tensor([response_seed(s.seed, i, step) for i in ids])
        if isinstance(reference, torch.nn.Module):
            with torch.no_grad():
                ref = reference(*inputs, per_token="reference_tokens" in needs)
            if d.world_size > 1:
                reference.reshard()  # a no-grad forward leaves FSDP2's root parameters gathered
            tensors |= {"reference_chosen_logps": ref[:len(ids)], "reference_rejected_logps": ref[len(ids):]}
        elif reference is not None:
            ref = reference(ids, logps.shape[-1] if logps.dim() == 2 else 0)
            tensors |= {"reference_chosen_logps": ref[0].to(d.device), "reference_rejected_logps": ref[1].to(d.device)}
        result = objective_losses(objective, **tensors)
        (result.losses.sum() * d.world_size / len(batch)).backward()
        margin = result.chosen_rewards - result.rejected_rewards
        sequence_logps = logps.sum(-1) if per_token else logps
        values = {"loss": result.losses, "rewards/chosen": result.chosen_rewards,
                  "rewards/rejected": result.rejected_rewards, "rewards/margin": margin, "rewards/accuracy": margin > 0,
                  "logps/chosen": sequence_logps[:len(ids)], "logps/rejected": sequence_logps[len(ids):],
                  "length/chosen": tensors["chosen_lengths"], "length/rejected": tensors["rejected_lengths"]}
        if len(objective.terms) > 1:
            values |= {f"loss/{name}": part for name, part in result.components.items()}
        for name, v in values.items():
            sums[name] = sums.get(name, 0) + v.detach().float().sum()
    return sums


def main(s: Settings, hyperparameters) -> torch.nn.Module | None:
    """Train; return the trained model (for tests and notebooks)."""
    require_input(s.data, DEFAULT_DATA, "python embedded.py --out_dir data/embedded")
    require_input(s.model, DEFAULT_MODEL, "python sft.py --config configs/sft.yaml")
    for model in (s.model, s.ref_model):  # before anything is written
        if model:
            check_model_dir(model)
    objective = build_objective(s, hyperparameters)  # its hyperparameters checked before anything is written
    config = text_config(s.model, s.trust_remote_code)
    s = shared_prompt_setting(s, [config] + ([text_config(s.ref_model, s.trust_remote_code)] if s.ref_model else []))
    if (run := start_training(s, "dpo", unit="pairs", keep=(REF_CACHE,))) is None:
        return None
    d, needs = run.d, objective.needs

    tokenizer = load_tokenizer(s.model, s.trust_remote_code)
    if s.ref_model and "reference" in objective.needs:
        check_same_vocabulary(tokenizer, s.model, s.ref_model, "--ref_model", s.trust_remote_code)
    rows = load_rows(s.data, PAIR_FIELDS)
    pairs, stats = encode_pairs(rows, tokenizer, s, config.vocab_size)
    run.plan(len(pairs), stats, describe(stats, s), s, hyperparameters, data_hash=rows_fingerprint(rows),
             what=describe_objective(s, hyperparameters))
    # before the policy exists (one model in memory at a time) and before a checkpoint is loaded into it
    ref, reference, live = None, None, None
    if "reference" in needs and not s.sync_ref_model:
        ref = reference_logps(pairs, s, padding_id(tokenizer), d, per_token="reference_tokens" in needs)
        reference = cached_reference(ref, pairs, per_token="reference_tokens" in needs)

    policy = wrap_policy(load_model(s.model, DTYPES[s.dtype], s.trust_remote_code), d, s.chunk_size,
                         s.activation_checkpointing, compute_dtype(s.compute_dtype, d.device.type),
                         s.torch_compile)
    if s.sync_ref_model:
        reference = live = wrap_policy(load_model(s.ref_model or s.model, DTYPES[s.dtype], s.trust_remote_code), d,
                                       s.chunk_size, compute_dtype=compute_dtype(s.compute_dtype, d.device.type))
    optimizer = adamw(policy, s)
    run.resume(policy, optimizer, live)
    for step, batch in run.steps(row_lengths(pairs, s.shared_prompt)):
        lr = set_lr(optimizer, run.lr(step))
        sums = accumulate_gradients(policy, pairs, batch, step, objective, reference, s, padding_id(tokenizer), d)
        grad_norm = clip_grad_norm(policy, s.max_grad_norm)
        means = {name: total / len(batch) for name, total in all_reduce_sums(d, sums).items()}
        run.check_finite(step, {"loss": means["loss"], "gradient norm": grad_norm})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if live is not None and (step + 1) % s.ref_model_sync_steps == 0:
            sync_reference(live, policy, s.ref_model_mixup_alpha)
        tokens = {"tokens": pair_tokens(pairs, batch), "model_tokens": pair_tokens(pairs, batch, s.shared_prompt)}
        run.log_step(step, batch, {"lr": lr, **means, "grad_norm": grad_norm, **tokens}, policy, optimizer, live)
    run.finish(policy, tokenizer, {"ref_logps_s": 0.0 if ref is None else ref[2]})
    return policy.model


if __name__ == "__main__":
    run_main(main, settings_classes)
