"""Score sampled responses with a reward and turn each prompt's best and worst into a preference pair.

    python label.py --samples runs/dpo/iter1/samples.jsonl --reward_fn embedded:proxy_reward
    torchrun --nproc_per_node 8 label.py --samples ... --reward_model Nexusflow/Starling-RM-34B

The stage: read samples.jsonl (sample.py's output) -> score every response -> per prompt, the
highest-scoring response is "chosen" and the lowest "rejected" -> write, into --output_dir (default:
beside the samples):
- scores.jsonl: the samples rows with "score" added to every response;
- pairs.jsonl: one row per kept prompt, what dpo.py reads: {"prompt", "chosen", "rejected",
  "chosen_score", "rejected_score", "reward_gap", "chosen_length", "rejected_length", "length_gap"}
  (lengths in policy tokens, EOS included; gaps are chosen minus rejected);
- label_stats.json: counts (prompts, responses scored, pairs written; prompts dropped as ties, below the
  margin, or with fewer than two usable responses; responses left out as unfinished or empty) and the length
  signals that iLR-DPO is about: the mean chosen-minus-rejected length gap, the share of pairs whose
  chosen response is the longer, the correlation of reward with length (pooled, and within prompt:
  scores and lengths centred on their prompt's mean), and the share of responses without EOS.

The reward is a Python function (--reward_fn module:function, called as fn(prompts, responses) ->
list of floats, with the user prompt text and the response text) or a sequence-classification reward
model (--reward_model, one label) that reads the conversation through its own tokenizer and chat
template (brevity.scoring.RewardModel). Under torchrun the prompts are split over processes.

Which responses may form a pair: finished ones (EOS emitted; --keep_unfinished to allow cut ones)
with non-empty text (dpo.py rejects empty strings). A prompt is dropped when fewer than two remain,
when best and worst tie (equal score or the same text), or when their gap is below --min_margin. A
NaN or infinite score is an error naming the row: it means a broken reward, not a bad response.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

from brevity.config import UserError, run_main, setting
from brevity.dist import all_gather_objects, barrier, cleanup_distributed, setup_distributed
from brevity.files import atomic_write_text, read_jsonl, save_settings, write_jsonl
from brevity.models import COMPUTE_DTYPE_HELP, compute_dtype, inference_dtype
from brevity.scoring import load_scorer


@dataclasses.dataclass
class Settings:
    samples: str = setting("runs/samples.jsonl", "sample.py's output: rows with prompt and responses")
    output_dir: str = setting("", "where scores.jsonl, pairs.jsonl and label_stats.json go; empty: beside --samples")
    reward_fn: str = setting("", "reward function module:function (or file.py:function), "
                                 "fn(prompts, responses) -> list of floats; e.g. embedded:proxy_reward")
    reward_model: str = setting("", "reward model: a local directory or hub id of a sequence classifier with one label")
    min_margin: float = setting(0.0, "drop a pair whose reward gap (best minus worst) is below this")
    keep_unfinished: bool = setting(False, "let responses without EOS (finish_reason 'length') form pairs")
    batch_size: int = setting(16, "reward model: sequences per forward pass")
    max_length: int = setting(0, "reward model: a longer conversation loses tokens from the left; 0: no limit")
    text_format: str = setting("", "the text the reward model reads, with {prompt} (the last user turn) and "
                                   "{response}, \\n a newline; used instead of its chat template; empty: its chat "
                                   "template, else its pair encoding (prompt, response)")
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "reward model dtype; auto: the compute dtype (float32 weights compute in --compute_dtype by autocast)")
    compute_dtype: typing.Literal["auto", "float32", "bfloat16"] = setting("auto", COMPUTE_DTYPE_HELP)
    trust_remote_code: bool = setting(False, "run model/tokenizer code from the hub (only for models you trust)")


def check_rows(rows: list[dict], path: str) -> None:
    """Every response must be {"text": str, "num_tokens": int, "finish_reason": "eos" | "length"}."""
    for i, row in enumerate(rows):
        if not row["responses"]:
            raise UserError(f"{path}: row {i + 1}: no responses")
        for j, r in enumerate(row["responses"]):
            if not (isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("num_tokens"), int)
                    and r.get("finish_reason") in ("eos", "length")):
                raise UserError(f"{path}: row {i + 1}: response {j + 1} needs text (string), num_tokens (integer) "
                                "and finish_reason ('eos' or 'length')")


def score_rows(rows: list[dict], indices: list[int], scorer) -> dict[int, list[float]]:
    """{row index: the scores of its responses} for the rows in `indices`, in one scorer call."""
    prompts = [rows[i]["prompt"] for i in indices for _ in rows[i]["responses"]]
    responses = [r["text"] for i in indices for r in rows[i]["responses"]]
    flat = iter(scorer(prompts, responses) if responses else [])
    return {i: [next(flat) for _ in rows[i]["responses"]] for i in indices}


def check_scores(rows: list[dict], scores: dict[int, list[float]], path: str) -> None:
    for i in sorted(scores):
        for j, value in enumerate(scores[i]):
            if not math.isfinite(value):
                raise UserError(f"{path}: row {i + 1}: response {j + 1} got score {value} (prompt: "
                                f"{json.dumps(rows[i]['prompt'])[:80]}); the reward must be a finite number")


def make_pair(row: dict, min_margin: float, keep_unfinished: bool) -> tuple[dict | None, str]:
    """(pair, "") or (None, why it was dropped). Best and worst by score; the first one on equal scores."""
    usable = [r for r in row["responses"] if (keep_unfinished or r["finish_reason"] == "eos") and r["text"]]
    if len(usable) < 2:
        return None, "fewer_than_two"
    best = max(usable, key=lambda r: r["score"])
    worst = min(usable, key=lambda r: r["score"])
    if best["score"] == worst["score"] or best["text"] == worst["text"]:
        return None, "tie"
    if best["score"] - worst["score"] < min_margin:
        return None, "below_margin"
    return {"prompt": row["prompt"], "chosen": best["text"], "rejected": worst["text"],
            "chosen_score": best["score"], "rejected_score": worst["score"],
            "reward_gap": best["score"] - worst["score"], "chosen_length": best["num_tokens"],
            "rejected_length": worst["num_tokens"], "length_gap": best["num_tokens"] - worst["num_tokens"]}, ""


def correlation(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than two points."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def label_stats(rows: list[dict], pairs: list[dict], drops: dict[str, int], keep_unfinished: bool) -> dict:
    responses = [r for row in rows for r in row["responses"]]
    scores = [r["score"] for r in responses]
    lengths = [float(r["num_tokens"]) for r in responses]
    centred_scores, centred_lengths = [], []
    for row in rows:  # within a prompt: does the longer response of the same prompt score higher?
        s = [r["score"] for r in row["responses"]]
        n = [float(r["num_tokens"]) for r in row["responses"]]
        centred_scores += [x - sum(s) / len(s) for x in s]
        centred_lengths += [x - sum(n) / len(n) for x in n]
    gaps = [p["length_gap"] for p in pairs]
    return {
        "prompts": len(rows),
        "responses_scored": len(responses),
        "pairs_written": len(pairs),
        "dropped_ties": drops["tie"],
        "dropped_below_margin": drops["below_margin"],
        "dropped_fewer_than_two_usable": drops["fewer_than_two"],
        "dropped_unfinished": 0 if keep_unfinished else sum(r["finish_reason"] == "length" for r in responses),
        "dropped_empty": sum(not r["text"] for r in responses),
        "mean_length_gap": sum(gaps) / len(gaps) if gaps else None,
        "share_chosen_longer": sum(g > 0 for g in gaps) / len(gaps) if gaps else None,
        "share_chosen_shorter": sum(g < 0 for g in gaps) / len(gaps) if gaps else None,
        "mean_reward_gap": sum(p["reward_gap"] for p in pairs) / len(pairs) if pairs else None,
        "reward_length_correlation": correlation(scores, lengths),
        "reward_length_correlation_within_prompt": correlation(centred_scores, centred_lengths),
        "share_without_eos": sum(r["finish_reason"] == "length" for r in responses) / len(responses),
        "mean_length": sum(lengths) / len(lengths),
        "mean_score": sum(scores) / len(scores),
    }


def main(s: Settings) -> dict | None:
    """Label; return label_stats (for tests and notebooks), or None when the outputs already exist."""
    out = Path(s.output_dir or Path(s.samples).parent)
    names = ("scores.jsonl", "label_stats.json", "pairs.jsonl")
    if all((out / n).is_file() for n in names):
        print(f"{out} already holds {', '.join(names)}; nothing to do (remove them to label again)")
        return None
    if s.batch_size < 1 or s.max_length < 0:
        raise UserError("--batch_size must be >= 1 and --max_length >= 0")
    rows = read_jsonl(s.samples, required={"prompt": (str, list), "responses": list})
    check_rows(rows, s.samples)
    d = setup_distributed()
    scorer = load_scorer(s.reward_fn, s.reward_model, d.device, inference_dtype(s.dtype, d.device, s.compute_dtype),
                         s.batch_size, s.max_length, s.text_format, s.trust_remote_code, flag="reward",
                         compute_dtype=compute_dtype(s.compute_dtype, d.device.type))
    scores = {}
    for part in all_gather_objects(d, score_rows(rows, list(range(d.rank, len(rows), d.world_size)), scorer)):
        scores.update(part)
    check_scores(rows, scores, s.samples)
    rows = [{**row, "responses": [{**r, "score": v} for r, v in zip(row["responses"], scores[i])]}
            for i, row in enumerate(rows)]
    pairs, drops = [], {"tie": 0, "below_margin": 0, "fewer_than_two": 0}
    for row in rows:
        pair, why = make_pair(row, s.min_margin, s.keep_unfinished)
        if pair:
            pairs.append(pair)
        else:
            drops[why] += 1
    stats = label_stats(rows, pairs, drops, s.keep_unfinished)
    if d.is_main:
        write_jsonl(out / "scores.jsonl", rows)
        atomic_write_text(out / "label_stats.json", json.dumps(stats, indent=1) + "\n")
        save_settings(out, s, name="label_settings.json")
    if not pairs:
        raise UserError(f"{s.samples}: no pair survived ({drops['tie']} ties, {drops['below_margin']} below "
                        f"--min_margin, {drops['fewer_than_two']} with fewer than two usable responses); "
                        f"see {out / 'label_stats.json'}")
    if d.is_main:
        write_jsonl(out / "pairs.jsonl", pairs)  # last: its presence means the stage is done
        within = stats["reward_length_correlation_within_prompt"]
        print(f"wrote {out / 'pairs.jsonl'}: {len(pairs)} pairs of {len(rows)} prompts; chosen minus rejected "
              f"length {stats['mean_length_gap']:+.2f} tokens; reward-length correlation within prompt "
              + (f"{within:.2f}" if within is not None else "undefined"))
    barrier(d)
    cleanup_distributed()
    return stats


if __name__ == "__main__":
    run_main(main, (Settings,))
