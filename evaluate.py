r"""Evaluate a policy on held-out prompts with a gold scorer, against the dataset's reference and the SFT model.

    python evaluate.py --model runs/dpo/iter1/model --sft_model runs/sft --prompts data/embedded/eval.jsonl \
        --gold_fn embedded:gold_score --output_dir runs/dpo/iter1/eval \
        --sft_generations runs/dpo/iter0/eval/generations.jsonl
    python evaluate.py --summarize runs/dpo      # one table over runs/dpo/iter*/ (eval.json, label_stats.json)

The stage: one response per prompt from the policy (sampled as sample.py samples: sorted, left-padded
batches, response i seeded by (seed, i)) -> log-probs of those responses under the policy and the SFT
model -> the SFT model's responses to the same prompts with the same seeds (read from
--sft_generations when that file exists, else generated and written there for the next iteration)
-> gold scores of policy, SFT and reference ("chosen") responses -> metrics (the Hitchhiker's guide
to *PO, section 2 of PAPERS.md), over the prompts:

- gold_score: mean gold score of the policy's responses (also _sft and _chosen);
- win_rate_vs_chosen, win_rate_vs_sft: share of prompts where the policy's response scores higher
  (a tie counts half);
- lc_win_rate_vs_sft: length-controlled, in the manner of AlpacaEval 2.0: a logistic regression
  P(win) = sigmoid(a + b * tanh(dlen / sd(dlen))), dlen the policy-minus-SFT length in tokens, and
  the predicted win rate at dlen = 0, sigmoid(a) (`length_controlled_win_rate`);
- win_rate_vs_sft_equal_length: the plain win rate over the prompts where the two responses have
  the same number of tokens (prompts_equal_length of them; null if none), the data's own answer to
  what the LC regression estimates;
- kl_vs_sft: mean over responses y ~ pi of sum_t [log pi(y_t) - log pi_sft(y_t)] (a Monte-Carlo KL
  estimate at temperature 1 and top_p 1; at other settings it is the log-ratio on those samples);
- kl_per_token_vs_sft: the same divided by |y| per response, then averaged;
- length, length_sft, length_chosen: mean response tokens under the policy's tokenizer, EOS included
  when emitted; share_without_eos: responses cut by max_new_tokens;
- standard errors of the gold score, the win rates and the KL.

Best-of-n (`--best_of N`, as the Storm-7B model card reports its best-of-64 row): the policy samples
N responses per prompt (response j to prompt i seeded by (seed, i, j), so j = 0 is the plain
evaluation's), the labelling reward (--reward_fn or --reward_model, never the gold) scores them, and
the highest-scoring one (the first on ties) is the policy's response. The SFT responses stay one
sample each. kl_vs_sft is then the mean log-ratio of the kept responses, not the best-of-n policy's
KL (which is at most log N - (N - 1) / N nats above the policy's).

Outputs in --output_dir: eval.json (the metrics, written last), generations.json (AlpacaEval's
model-outputs format: instruction, output, generator, dataset), details.jsonl (per prompt: responses,
lengths, scores, log-probs) and settings.json. The generated SFT responses go to --sft_generations
(JSONL: prompt, output, num_tokens, finish_reason and the generation settings), or to
output_dir/sft_generations.jsonl when no path is given. Until eval.json is written, each process keeps
its responses and log-probs in responses.rank{R}.json, so a rerun after the gold scorer failed scores
them instead of generating again. Under torchrun the prompts are split over processes (each holds a
full copy of a model, one model at a time).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from brevity.config import UserError, run_main, setting
from brevity.dist import all_gather_objects, barrier, cleanup_distributed, setup_distributed
from brevity.files import (PROMPT, RESPONSE, atomic_write_text, check_output_path, load_rows, read_json, read_jsonl,
                           rows_fingerprint, save_settings, write_jsonl)
from brevity.generation import GenerationSettings, check_generation_settings, generate_responses, response_seed, sampling_key
from brevity.logprobs import SequenceLogps, response_logps
from brevity.models import (autocast_dtype, check_model_dir, check_same_vocabulary, compute_dtype, inference_dtype,
                            load_model, load_tokenizer, model_fingerprint, release_memory)
from brevity.scoring import load_function, load_scorer, score_batches
from brevity.tokens import encode_prompts, encode_responses, padding_id, prompt_user_text, response_text
from brevity.tracking import check_tracker, start_tracker


@dataclasses.dataclass
class Settings(GenerationSettings):
    model: str = setting("runs/sft", "policy to evaluate: a local Hugging Face directory or a hub id")
    sft_model: str = setting("runs/sft", "the SFT (starting) model: the KL reference and the win-rate opponent")
    prompts: str = setting("data/embedded/eval.jsonl", "held-out rows with `prompt` and `chosen` (the reference "
                                                       "response), JSONL or a dataset; an optional `dataset` names "
                                                       "the subset")
    gold_fn: str = setting("", "gold scorer function module:function (or file.py:function), fn(prompts, responses) "
                               "-> floats; e.g. embedded:gold_score. Must not be the reward used for labels")
    gold_model: str = setting("", "gold reward model: a directory or hub id of a sequence classifier with one label")
    sft_generations: str = setting("", "JSONL of the SFT model's responses: reused when it exists, else written; "
                                       "empty: output_dir/sft_generations.jsonl, not reused")
    output_dir: str = setting("runs/eval", "gets eval.json, generations.json, details.jsonl, settings.json")
    gold_batch_size: int = setting(16, "responses per gold call (a reward model's forward pass, or a function call)")
    gold_max_length: int = setting(0, "gold reward model: a longer conversation loses tokens from the left; 0: no "
                                      "limit")
    gold_text_format: str = setting("", "the text the gold reward model reads, with {prompt} (the last user turn) "
                                        "and {response}, \\n a newline; used instead of its chat template; empty: "
                                        "its chat template, else its pair encoding")
    generator: str = setting("", "the `generator` name in generations.json; empty: --model")
    best_of: int = setting(1, "sample this many responses per prompt and keep the one the labelling reward "
                              "(--reward_fn / --reward_model) scores highest; 1: one sample")
    reward_fn: str = setting("", "best-of-n: the labelling reward function module:function (label.py's), e.g. "
                                 "embedded:proxy_reward; never the gold")
    reward_model: str = setting("", "best-of-n: the labelling reward model, a directory or hub id (label.py's)")
    reward_max_length: int = setting(0, "best-of-n reward model: a longer conversation loses tokens from the left; "
                                        "0: no limit")
    reward_text_format: str = setting("", "best-of-n reward model: the text it reads (as --gold_text_format)")
    trust_remote_code: bool = setting(False, "run model/tokenizer code from the hub (only for models you trust)")
    wandb_project: str = setting("", "also log eval.json's numbers to this Weights & Biases project (pip install "
                                     "wandb); empty: off")


@dataclasses.dataclass
class SummarySettings:
    summarize: list[str] = dataclasses.field(default_factory=list, metadata={"help": (
        "run directories: print and save (summary.jsonl, summary.md, summary.png) the table of each one's "
        "iter*/eval/eval.json; with several, also one figure with a line per run (--figure)")})
    figure: str = setting("", "the figure of several runs; empty: summary.png in their common parent directory")


def win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def mean_and_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def length_controlled_win_rate(wins: list[float], length_diffs: list[float], l2: float = 1e-3) -> dict:
    """AlpacaEval 2.0's idea with a single comparison model: fit
    P(win) = sigmoid(a + b * tanh(dlen / sd(dlen))) to the wins (soft labels: a tie is 0.5) by maximum
    likelihood (Newton's method on the mean log-likelihood, steps halved until it rises) and return
    {"lc_win_rate": sigmoid(a), the win rate at zero length difference, "intercept": a, "slope": b,
    "length_scale": sd(dlen), "penalised": bool}. With equal lengths (sd 0) only a is fitted and the LC
    win rate is the plain win rate.

    The maximum-likelihood fit is finite unless the outcomes are separated by length: every prompt won
    (or lost), or every win at a length difference at least (or at most) that of every loss, a tie
    counting as both. Only then the fit falls back to the mean log-likelihood minus l2/2 * (a^2 + b^2),
    which keeps a and b finite ("penalised": true).
    """
    y = torch.tensor(wins, dtype=torch.float64)
    d = torch.tensor(length_diffs, dtype=torch.float64)
    scale = float(d.std()) if len(d) > 1 else 0.0
    x = torch.tanh(d / scale) if scale > 0 else torch.zeros_like(d)
    won, lost = x[y > 0], x[y < 1]  # where the soft labels put weight on a win, and on a loss
    if scale > 0:
        separated = len(won) == 0 or len(lost) == 0 or lost.max() <= won.min() or won.max() <= lost.min()
        features = torch.stack([torch.ones_like(x), x], dim=1)
    else:
        separated = len(won) == 0 or len(lost) == 0
        features = torch.ones_like(x)[:, None]
    penalty = l2 if separated else 0.0

    def objective(w):  # the mean log-likelihood, less the penalty
        z = features @ w
        return float((y * z - torch.nn.functional.softplus(z)).mean() - penalty / 2 * (w @ w))

    w = torch.zeros(features.shape[1], dtype=torch.float64)
    eye = torch.eye(len(w), dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(features @ w)
        grad = features.T @ (y - p) / len(y) - penalty * w
        hessian = (features.T * (p * (1 - p))) @ features / len(y) + penalty * eye
        step, before = torch.linalg.solve(hessian, grad), objective(w)
        while objective(w + step) < before and step.abs().max() > 1e-12:
            step = step / 2
        w = w + step
        if step.abs().max() < 1e-12:
            break
    slope = float(w[1]) if len(w) > 1 else 0.0
    return {"lc_win_rate": float(torch.sigmoid(w[0])), "intercept": float(w[0]), "slope": slope,
            "length_scale": scale, "penalised": bool(separated)}


def metrics(records: list[dict]) -> dict:
    """eval.json's numbers from the per-prompt records (see the module docstring)."""
    out = {"prompts": len(records)}
    for name, values in {
        "gold_score": [r["gold"] for r in records],
        "win_rate_vs_chosen": [win(r["gold"], r["chosen_gold"]) for r in records],
        "win_rate_vs_sft": [win(r["gold"], r["sft_gold"]) for r in records],
        "kl_vs_sft": [r["logp"] - r["sft_logp"] for r in records],
        "kl_per_token_vs_sft": [(r["logp"] - r["sft_logp"]) / r["num_tokens"] for r in records],
    }.items():
        out[name], out[name + "_stderr"] = mean_and_stderr(values)
    fit = length_controlled_win_rate([win(r["gold"], r["sft_gold"]) for r in records],
                                     [r["num_tokens"] - r["sft_num_tokens"] for r in records])
    out["lc_win_rate_vs_sft"] = fit.pop("lc_win_rate")
    out["lc_fit"] = fit
    equal = [win(r["gold"], r["sft_gold"]) for r in records if r["num_tokens"] == r["sft_num_tokens"]]
    out["prompts_equal_length"] = len(equal)
    out["win_rate_vs_sft_equal_length"], out["win_rate_vs_sft_equal_length_stderr"] = (
        mean_and_stderr(equal) if equal else (None, None))
    n = len(records)
    out.update({
        "gold_score_sft": sum(r["sft_gold"] for r in records) / n,
        "gold_score_chosen": sum(r["chosen_gold"] for r in records) / n,
        "length": sum(r["num_tokens"] for r in records) / n,
        "length_sft": sum(r["sft_num_tokens"] for r in records) / n,
        "length_chosen": sum(r["chosen_num_tokens"] for r in records) / n,
        "share_without_eos": sum(r["finish_reason"] == "length" for r in records) / n,
        "share_without_eos_sft": sum(r["sft_finish_reason"] == "length" for r in records) / n,
    })
    return out


def same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def read_sft_generations(path: Path, rows: list[dict], s: Settings) -> list[dict]:
    """The saved SFT responses; they must answer these prompts, in this order, with these settings."""
    saved = read_jsonl(path, required={"prompt": (str, list), "num_tokens": int, "finish_reason": str})
    for i, row in enumerate(saved):  # an empty output is a fine response, so not in `required`
        if not isinstance(row.get("output"), str):
            raise UserError(f"{path}:{i + 1}: needs an `output` string")
    if len(saved) != len(rows):
        raise UserError(f"{path}: {len(saved)} SFT responses for {len(rows)} prompts in {s.prompts}; remove it to "
                        "generate them again")
    for i, (old, row) in enumerate(zip(saved, rows)):
        if old["prompt"] != row["prompt"]:
            raise UserError(f"{path}:{i + 1}: answers another prompt than {s.prompts} row {i + 1}")
        changed = [f"{k} {old.get(k)} (now {v})" for k, v in sampling_key(s).items() if old.get(k) != v]
        if not same_model(str(old.get("generator")), s.sft_model):
            changed.append(f"model {old.get('generator')} (now {s.sft_model})")
        if changed:
            raise UserError(f"{path}:{i + 1}: generated with {', '.join(changed)}; remove it or use those settings")
    return saved


def best_indices(scores: list[float], n: int) -> list[int]:
    """Per consecutive group of `n` scores (one prompt's candidates), the index (into `scores`) of the
    highest, the first of equal ones."""
    return [start + max(range(n), key=lambda j: (scores[start + j], -j)) for start in range(0, len(scores), n)]


def best_of_n(s: Settings, d, tokenizer, prompts: list, prompt_ids: list[list[int]], indices: list[int]) -> list[dict]:
    """s.best_of responses per prompt from the policy, scored by the labelling reward; per prompt the
    highest-scoring one, with all its candidates' scores as "best_of_scores". The policy is released
    before the reward is loaded."""
    n = s.best_of
    model = load_model(s.model, inference_dtype(s.dtype, d.device), s.trust_remote_code).to(d.device)
    seeds = [response_seed(s.seed, i, j) for i in indices for j in range(n)]
    candidates = generate_responses(model, tokenizer, [p for p in prompt_ids for _ in range(n)], seeds, s,
                                    f"evaluate: best of {n}" if d.is_main else None)
    del model
    release_memory()
    scorer = load_scorer(s.reward_fn, s.reward_model, d.device, inference_dtype(s.dtype, d.device),
                         s.gold_batch_size, s.reward_max_length, s.reward_text_format, s.trust_remote_code)
    scores = scorer([p for p in prompts for _ in range(n)], [c["text"] for c in candidates])
    bad = next((j for j, v in enumerate(scores) if not math.isfinite(v)), None)
    if bad is not None:
        raise UserError(f"the reward returned {scores[bad]} for sample {bad % n} of prompt {indices[bad // n]} "
                        f"(0-based row of the prompts); scores must be finite numbers")
    return [{**candidates[k], "best_of_scores": scores[k - k % n:k - k % n + n]} for k in best_indices(scores, n)]


def model_pass(name: str, s: Settings, d, tokenizer, prompt_ids: list[list[int]], indices: list[int],
               generate: bool, response_ids: list[list[int]] | None = None) -> tuple[list[dict] | None, list[float]]:
    """Load model `name`, sample one response per prompt if `generate` (response i seeded by (seed,
    i)), and score `response_ids` (default: the responses just sampled) under it: (responses or None,
    log pi(response | prompt) per prompt). The model is released before this returns, so one model
    at a time is in memory."""
    weights = inference_dtype(s.dtype, d.device, s.compute_dtype)
    compute = compute_dtype(s.compute_dtype, d.device.type)
    model = load_model(name, weights, s.trust_remote_code).to(d.device)
    responses = None
    if generate:
        seeds = [response_seed(s.seed, i, 0) for i in indices]
        responses = generate_responses(model, tokenizer, prompt_ids, seeds, s,
                                       f"evaluate: {name}" if d.is_main else None)
    if response_ids is None:
        response_ids = [r["token_ids"] for r in responses]
    logps = response_logps(SequenceLogps(model, autocast_dtype=autocast_dtype(weights, compute)),
                           list(zip(prompt_ids, response_ids)), s.batch_size, padding_id(tokenizer)).tolist()
    del model
    release_memory()
    return responses, logps


# the settings that do not change a process's responses or log-probs: the gold scorer's, and where and
# under what name the results go
NOT_IN_RESPONSES = ("gold_fn", "gold_model", "gold_batch_size", "gold_max_length", "gold_text_format", "generator",
                    "output_dir", "wandb_project")


def responses_path(out: Path, rank: int) -> Path:
    """A process's responses and log-probs, kept until eval.json is written: a rerun after the gold
    scorer failed (a bug in a gold function, a reward model out of memory) does not generate again."""
    return out / f"responses.rank{rank}.json"


def responses_key(s: Settings, rows: list[dict], indices: list[int]) -> dict:
    """What a process's responses and log-probs depend on: every setting but NOT_IN_RESPONSES, the
    two models' files, the prompts and which of them the process has."""
    return {**{k: v for k, v in dataclasses.asdict(s).items() if k not in NOT_IN_RESPONSES},
            "model_files": model_fingerprint(s.model), "sft_model_files": model_fingerprint(s.sft_model),
            "rows": rows_fingerprint(rows), "indices": indices}


def shard_responses(s: Settings, d, tokenizer, rows: list[dict], indices: list[int],
                    sft_saved: list[dict] | None) -> dict:
    """The policy's and the SFT model's responses to the prompts in `indices` and the log-probs of the
    policy's under both: {"policy", "logps", "sft", "sft_logps"}; read back from `responses_path` if a
    run with the same `responses_key` left it, else computed and written there."""
    path, key = responses_path(Path(s.output_dir), d.rank), responses_key(s, rows, indices)
    if path.is_file():
        saved = read_json(path)
        if saved.get("key") == key:
            print(f"{path}: the responses of an earlier run with these settings; not generating them again")
            return saved["responses"]
    prompts = [rows[i]["prompt"] for i in indices]
    prompt_ids = encode_prompts(tokenizer, prompts)
    if s.best_of > 1:
        policy = best_of_n(s, d, tokenizer, prompts, prompt_ids, indices)
        _, logps = model_pass(s.model, s, d, tokenizer, prompt_ids, indices, generate=False,
                              response_ids=[r["token_ids"] for r in policy])
    else:
        policy, logps = model_pass(s.model, s, d, tokenizer, prompt_ids, indices, generate=True)
    if same_model(s.model, s.sft_model) and s.best_of == 1:
        sft, sft_logps = policy, logps
    else:
        sft, sft_logps = model_pass(s.sft_model, s, d, tokenizer, prompt_ids, indices, generate=sft_saved is None,
                                    response_ids=[r["token_ids"] for r in policy])
    if sft_saved is not None:
        sft = [{"text": sft_saved[i]["output"], "num_tokens": sft_saved[i]["num_tokens"],
                "finish_reason": sft_saved[i]["finish_reason"]} for i in indices]
    responses = {"policy": policy, "logps": logps, "sft": sft, "sft_logps": sft_logps}
    atomic_write_text(path, json.dumps({"key": key, "responses": responses}, ensure_ascii=False))
    return responses


def evaluate_shard(s: Settings, d, rows: list[dict], indices: list[int], sft_saved: list[dict] | None) -> list[dict]:
    """Per-prompt records for the prompts in `indices`: responses, lengths, log-probs, gold scores.
    The SFT model's responses come from `sft_saved` when given, else they are sampled here."""
    tokenizer = load_tokenizer(s.model, s.trust_remote_code)
    prompts = [rows[i]["prompt"] for i in indices]
    r = shard_responses(s, d, tokenizer, rows, indices, sft_saved)
    policy, logps, sft, sft_logps = r["policy"], r["logps"], r["sft"], r["sft_logps"]
    scorer = load_scorer(s.gold_fn, s.gold_model, d.device, inference_dtype(s.dtype, d.device, s.compute_dtype),
                         s.gold_batch_size, s.gold_max_length, s.gold_text_format, s.trust_remote_code, flag="gold",
                         compute_dtype=compute_dtype(s.compute_dtype, d.device.type))
    chosen_texts = [response_text(rows[i]["chosen"]) for i in indices]
    gold = score_batches(scorer, prompts * 3, [g["text"] for g in policy] + chosen_texts + [g["text"] for g in sft],
                         s.gold_batch_size)
    n = len(indices)
    bad = next((j for j, v in enumerate(gold) if not math.isfinite(v)), None)
    if bad is not None:
        which = ("policy", "chosen", "SFT")[bad // n]
        raise UserError(f"gold scorer returned {gold[bad]} for the {which} response to prompt {indices[bad % n]} "
                        f"(0-based row of the prompts); scores must be finite numbers")
    chosen_lengths = [len(x) for x in encode_responses(tokenizer, chosen_texts)]
    return [{"index": i, "prompt": rows[i]["prompt"], "output": policy[k]["text"],
             "num_tokens": policy[k]["num_tokens"], "finish_reason": policy[k]["finish_reason"], "gold": gold[k],
             "logp": logps[k], "sft_logp": sft_logps[k], "chosen": chosen_texts[k],
             "chosen_num_tokens": chosen_lengths[k], "chosen_gold": gold[n + k], "sft_output": sft[k]["text"],
             "sft_num_tokens": sft[k]["num_tokens"], "sft_finish_reason": sft[k]["finish_reason"],
             "sft_gold": gold[2 * n + k], **({"best_of_scores": policy[k]["best_of_scores"]} if s.best_of > 1 else {})}
            for k, i in enumerate(indices)]


SUMMARY_COLUMNS = (("gold", "gold_score"), ("win/chosen", "win_rate_vs_chosen"), ("win/SFT", "win_rate_vs_sft"),
                   ("LC win/SFT", "lc_win_rate_vs_sft"), ("KL", "kl_vs_sft"), ("KL/token", "kl_per_token_vs_sft"),
                   ("length", "length"), ("no EOS", "share_without_eos"),
                   # from label.py on the samples this iteration trained on (drawn from the previous policy)
                   ("sampled length", "sampled/mean_length"), ("sampled no EOS", "sampled/share_without_eos"),
                   ("pair length gap", "sampled/mean_length_gap"),
                   ("reward~length", "sampled/reward_length_correlation"))
LABEL_KEYS = ("mean_length", "share_without_eos", "mean_length_gap", "share_chosen_longer",
              "reward_length_correlation", "reward_length_correlation_within_prompt", "pairs_written")


def summary_table(run_dir: str) -> list[dict]:
    """The rows of run_dir/iter*/eval/eval.json, by iteration, with label.py's statistics as `sampled/*`.

    Iteration k's row: the evaluation of iteration k's model (iteration 0: the starting model) and, as
    `sampled/*`, label.py's statistics of the samples iteration k trained on (drawn from iteration k-1's
    policy): mean sampled length, share without EOS, chosen-minus-rejected length gap of the pairs and
    the reward-length correlation. These are the length signals that show a loop drifting to verbosity.
    """
    found = {int(m.group(1)): p for p in Path(run_dir).glob("iter*/eval/eval.json")
             if (m := re.fullmatch(r"iter(\d+)", p.parent.parent.name))}
    if not found:
        raise UserError(f"{run_dir}: no iter*/eval/eval.json; run evaluate.py on the iterations first")
    table = []
    for k in sorted(found):
        row = {"iteration": k, **read_json(found[k])}
        stats_path = Path(run_dir) / f"iter{k}" / "label_stats.json"
        if stats_path.is_file():
            stats = read_json(stats_path)
            row.update({f"sampled/{key}": stats.get(key) for key in LABEL_KEYS})
        table.append(row)
    return table


def markdown_table(table: list[dict]) -> str:
    lines = ["| iteration | " + " | ".join(name for name, _ in SUMMARY_COLUMNS) + " |",
             "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for row in table:
        cells = [f"{row[key]:.3f}" if isinstance(row.get(key), (int, float)) else "-" for _, key in SUMMARY_COLUMNS]
        lines.append(f"| {row['iteration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(s: SummarySettings) -> dict[str, list[dict]]:
    """For each run directory: print its table and write summary.jsonl, summary.md and summary.png
    (gold, LC win rate and length per iteration) there; with several runs, also one figure with a
    line per run. Returns {run directory: table}."""
    if not s.summarize:
        raise UserError("--summarize needs at least one run directory")
    tables = {run_dir: summary_table(run_dir) for run_dir in s.summarize}
    for run_dir, table in tables.items():
        text = markdown_table(table)
        write_jsonl(Path(run_dir) / "summary.jsonl", table)
        atomic_write_text(Path(run_dir) / "summary.md", text)
        print(f"{run_dir}:\n{text}" if len(tables) > 1 else text, end="")
    try:
        from brevity import plots
    except ImportError:
        print("no figures: matplotlib is not installed (pip install -r requirements.txt)")
        return tables
    names = run_names(list(tables))
    for run_dir, table in tables.items():
        plots.plot_iterations({names[run_dir]: table}, Path(run_dir) / "summary.png")
    if len(tables) > 1:
        figure = s.figure or str(Path(os.path.commonpath([str(Path(r).resolve()) for r in tables])) / "summary.png")
        plots.plot_iterations({names[r]: t for r, t in tables.items()}, figure)
        print(f"wrote {figure}")
    return tables


def run_names(run_dirs: list[str]) -> dict[str, str]:
    """A legend name per run directory: its last component, or the whole path where two share it."""
    last = [Path(r).name or r for r in run_dirs]
    return {r: n if last.count(n) == 1 else r for r, n in zip(run_dirs, last)}


def main(s: Settings) -> dict | list | None:
    """Evaluate; return the metrics."""
    out = Path(s.output_dir)
    if (out / "eval.json").is_file():
        print(f"{out / 'eval.json'} exists; nothing to do (remove it to evaluate again)")
        return read_json(out / "eval.json")
    check_generation_settings(s)
    if s.gold_batch_size < 1 or s.gold_max_length < 0:
        raise UserError("--gold_batch_size must be >= 1 and --gold_max_length >= 0")
    if bool(s.gold_fn) == bool(s.gold_model):
        raise UserError("give exactly one of --gold_fn module:function and --gold_model DIR_OR_HUB_ID")
    if s.gold_fn:
        load_function(s.gold_fn, "--gold_fn")  # a wrong name fails now, not after generating
    check_tracker(s.wandb_project)
    if s.best_of < 1:
        raise UserError(f"need --best_of >= 1, got {s.best_of}")
    if s.best_of > 1:
        if bool(s.reward_fn) == bool(s.reward_model):
            raise UserError("--best_of needs exactly one of --reward_fn module:function and --reward_model DIR_OR_HUB_ID")
        if (s.reward_fn or s.reward_model) == (s.gold_fn or s.gold_model):
            raise UserError(f"--best_of: the labelling reward {s.reward_fn or s.reward_model} is the gold scorer; "
                            "best-of-n must not select with the judge")
        if s.reward_fn:
            load_function(s.reward_fn, "--reward_fn")
    sft_path = Path(s.sft_generations) if s.sft_generations else out / "sft_generations.jsonl"
    check_output_path(out, "--output_dir", directory=True)
    check_output_path(sft_path, "--sft_generations", directory=False)
    rows = load_rows(s.prompts, required={"prompt": PROMPT, "chosen": RESPONSE})
    sft_saved = read_sft_generations(sft_path, rows, s) if s.sft_generations and sft_path.is_file() else None
    for model in (s.model, s.sft_model):
        check_model_dir(model)
    if not same_model(s.model, s.sft_model):  # the KL reads the policy's ids under the SFT model
        check_same_vocabulary(load_tokenizer(s.model, s.trust_remote_code), s.model, s.sft_model, "--sft_model",
                              s.trust_remote_code)
    d = setup_distributed()
    records = []
    for part in all_gather_objects(d, evaluate_shard(s, d, rows, list(range(d.rank, len(rows), d.world_size)),
                                                     sft_saved)):
        records += part
    records.sort(key=lambda r: r["index"])
    result = metrics(records)
    if d.is_main:
        generator = s.generator or s.model
        dataset = Path(s.prompts).stem
        atomic_write_text(out / "generations.json", json.dumps(
            [{"instruction": prompt_user_text(r["prompt"]), "output": r["output"], "generator": generator,
              "dataset": rows[r["index"]].get("dataset", dataset)} for r in records], indent=1, ensure_ascii=False))
        write_jsonl(out / "details.jsonl", records)
        if sft_saved is None:
            write_jsonl(sft_path, [{"prompt": r["prompt"], "output": r["sft_output"], "num_tokens": r["sft_num_tokens"],
                                    "finish_reason": r["sft_finish_reason"], "generator": s.sft_model,
                                    **sampling_key(s)} for r in records])
        save_settings(out, s)
        result = {"model": s.model, "sft_model": s.sft_model, "eval_prompts": s.prompts,
                  "gold": s.gold_fn or s.gold_model, **sampling_key(s), "best_of": s.best_of,
                  **({"best_of_reward": s.reward_fn or s.reward_model} if s.best_of > 1 else {}), **result}
        atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")  # last: marks the stage done
        tracker = start_tracker(s.wandb_project, s.output_dir, dataclasses.asdict(s), d.is_main)
        tracker.log(result)
        tracker.finish(result)
        for path in out.glob("responses.rank*.json"):
            path.unlink()
        print(f"wrote {out / 'eval.json'}: gold {result['gold_score']:.3f}, win vs SFT {result['win_rate_vs_sft']:.3f} "
              f"(LC {result['lc_win_rate_vs_sft']:.3f}), KL {result['kl_vs_sft']:.2f}, length {result['length']:.1f}")
    barrier(d)
    cleanup_distributed()
    return result


if __name__ == "__main__":
    if "--summarize" in sys.argv[1:]:
        run_main(summarize, (SummarySettings,))
    else:
        run_main(main, (Settings,))
