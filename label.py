"""Score sampled responses with a reward and turn each prompt's best and worst into a preference pair.

    python label.py --samples runs/dpo/iter1/samples.jsonl --reward_fn embedded:proxy_reward
    torchrun --nproc_per_node 8 label.py --samples ... --reward_model Nexusflow/Starling-RM-34B

The stage: read samples.jsonl (sample.py's output) -> score every response -> per prompt, pairs by
--pair_rule (default: the highest-scoring response is "chosen" and the lowest "rejected") -> write,
into --output_dir (default: beside the samples):
- scores.jsonl: the samples rows with "score" added to every response;
- pairs.jsonl: one row per pair (one per kept prompt, but all_pairs may keep several), what dpo.py reads:
  {"prompt", "chosen", "rejected",
  "chosen_score", "rejected_score", "reward_gap", "chosen_length", "rejected_length", "length_gap"}
  (lengths in policy tokens, the end of turn included; gaps are chosen minus rejected), and, when the samples
  carry them, the sampled "chosen_token_ids", "rejected_token_ids" and their "vocab_sha256" (dpo.py trains on
  those ids, so a length means the same tokens in both stages);
- label_stats.json: counts (prompts, responses scored, pairs written; what the pair rule dropped as ties,
  below the margin, or with fewer than two usable responses; responses left out as unfinished or empty) and the length
  signals that iLR-DPO is about: the mean chosen-minus-rejected length gap, the share of pairs whose
  chosen response is the longer, the correlation of reward with length (pooled, and within prompt:
  scores and lengths centred on their prompt's mean), and the share of responses without EOS.

The reward is a Python function (--reward_fn module:function, called as fn(prompts, responses) ->
list of floats, with the user prompt text and the response text) or a sequence-classification reward
model (--reward_model, one label) that reads the conversation through its own tokenizer and chat
template (brevity.scoring.RewardModel). Under torchrun the prompts are split over processes.

Which responses may form a pair: finished ones (EOS emitted; --keep_unfinished to allow cut ones)
with text (dpo.py rejects empty and blank strings). Of those, --pair_rule picks (RLHFlow's names in
brackets): best_worst, best vs worst (max_min); best_random, best vs one of the others drawn per prompt
from --seed (max_random); best_second, best vs second best (max_max); all_pairs, every pair of them;
length_penalised, best vs worst by score - --length_penalty x num_tokens (max_min_p, in tokens rather
than characters). A candidate pair is dropped when it ties (equal ranking score or the same text) or
its gap is below --min_margin, a prompt when fewer than two responses remain. A NaN or infinite score
is an error naming the row: it means a broken reward, not a bad response.

Scores are kept as they come, --batch_size at a time, in OUTPUT_DIR/scores.jsonl.parts/REWARD/ (one
append-only log per process, each score under a hash of its prompt and response; REWARD a hash of
the function's name, or of the reward model's files and settings): a rerun after an interruption,
or after the reward function failed in a batch, scores only what is not there yet. The folder goes
when pairs.jsonl is written. It is tied to the function's name, not its code: after changing the
code of a function that scored wrongly, remove it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import typing
from pathlib import Path

from brevity.config import UserError, run_main, setting
from brevity.dist import all_gather_objects, barrier, cleanup_distributed, setup_distributed
from brevity.files import PROMPT, atomic_write_text, check_output_path, read_jsonl, save_settings, write_jsonl
from brevity.models import COMPUTE_DTYPE_HELP, compute_dtype, inference_dtype, model_fingerprint
from brevity.scoring import load_scorer, score_batches


@dataclasses.dataclass
class Settings:
    samples: str = setting("runs/samples.jsonl", "sample.py's output: rows with prompt and responses")
    output_dir: str = setting("", "where scores.jsonl, pairs.jsonl and label_stats.json go; empty: beside --samples")
    reward_fn: str = setting("", "reward function module:function (or file.py:function), "
                                 "fn(prompts, responses) -> list of floats; e.g. embedded:proxy_reward")
    reward_model: str = setting("", "reward model: a local directory or hub id of a sequence classifier with one label")
    pair_rule: typing.Literal["best_worst", "best_random", "best_second", "all_pairs", "length_penalised"] = setting(
        "best_worst", "which responses of a prompt form pairs: best vs worst, best vs a random other (--seed), "
                      "best vs second best, every pair, or best vs worst by score - --length_penalty x tokens")
    length_penalty: float = setting(0.0, "length_penalised: the score charged per response token (lambda)")
    seed: int = setting(0, "best_random: each prompt's draw comes from (seed, the prompt's row)")
    min_margin: float = setting(0.0, "drop a pair whose gap in ranking score (chosen minus rejected) is below this")
    keep_unfinished: bool = setting(False, "let responses without EOS (finish_reason 'length') form pairs")
    batch_size: int = setting(16, "responses per reward call (a reward model's forward pass, or a function call); "
                                  "their scores are kept as each batch ends")
    max_length: int = setting(0, "reward model: a longer conversation loses tokens from the left; 0: no limit")
    text_format: str = setting("", "the text the reward model reads, with {prompt} (the last user turn) and "
                                   "{response}, \\n a newline; used instead of its chat template; empty: its chat "
                                   "template, else its pair encoding (prompt, response)")
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "reward model dtype; auto: the compute dtype (float32 weights compute in --compute_dtype by autocast)")
    compute_dtype: typing.Literal["auto", "float32", "bfloat16"] = setting("auto", COMPUTE_DTYPE_HELP)
    trust_remote_code: bool = setting(False, "run model/tokenizer code from the hub (only for models you trust)")


def check_rows(rows: list[dict], path: str) -> None:
    """Every response must be {"text": str, "num_tokens": int (a count, not a bool), "finish_reason":
    "eos" | "length"}."""
    for i, row in enumerate(rows):
        if not row["responses"]:
            raise UserError(f"{path}: row {i + 1}: no responses")
        for j, r in enumerate(row["responses"]):
            n = r.get("num_tokens") if isinstance(r, dict) else None
            if not (isinstance(r, dict) and isinstance(r.get("text"), str) and type(n) is int and 0 <= n < 2**53
                    and r.get("finish_reason") in ("eos", "length")):
                raise UserError(f"{path}: row {i + 1}: response {j + 1} needs text (string), num_tokens (integer) "
                                "and finish_reason ('eos' or 'length')")
            ids = r.get("token_ids")
            if ids is not None and not (isinstance(ids, list) and len(ids) == r["num_tokens"]
                                        and all(isinstance(t, int) and t >= 0 for t in ids)):
                raise UserError(f"{path}: row {i + 1}: response {j + 1}: token_ids must be num_tokens "
                                "non-negative integers")


def response_key(prompt, text: str) -> str:
    return hashlib.sha256(json.dumps([prompt, text], ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


def reward_key(s: Settings) -> str:
    """What kept scores were made with: only scores of the same reward are reused."""
    return json.dumps({"reward_fn": s.reward_fn, "reward_model": model_fingerprint(s.reward_model) if s.reward_model
                       else "", "text_format": s.text_format, "max_length": s.max_length, "dtype": s.dtype})


def kept_scores_dir(out: Path, s: Settings) -> Path:
    return out / "scores.jsonl.parts" / hashlib.sha256(reward_key(s).encode("utf-8")).hexdigest()[:16]


def read_kept_scores(folder: Path) -> dict[str, float]:
    """{response key: score} from the logs in `folder` (`kept_scores_dir`) of earlier runs."""
    kept = {}
    for log in sorted(folder.glob("rank-*.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a last line cut by a kill
                continue
            kept.update(zip(entry["keys"], entry["scores"]))
    return kept


def open_score_log(folder: Path, s: Settings, rank: int):
    """This process's append-only log of scores in `folder`, beside the reward's key."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "run_key.json", reward_key(s))
    return open(folder / f"rank-{rank:05d}.jsonl", "a", encoding="utf-8")


def score_rows(rows: list[dict], indices: list[int], scorer, s: Settings, kept: dict[str, float], folder: Path,
               rank: int) -> dict[int, list[float]]:
    """{row index: the scores of its responses} for the rows in `indices`. Responses with a score in
    `kept` are not scored again; the others go to the scorer --batch_size at a time, longest first (a
    reward model pads less), and each batch's scores, once found finite, are appended to this
    process's log in `folder`."""
    keys = {(i, j): response_key(rows[i]["prompt"], r["text"])
            for i in indices for j, r in enumerate(rows[i]["responses"])}
    todo = sorted((ij for ij, key in keys.items() if key not in kept),
                  key=lambda ij: -len(rows[ij[0]]["responses"][ij[1]]["text"]))
    log = []

    def keep(start: int, scores: list[float]) -> None:
        batch = todo[start:start + len(scores)]
        check_scores(rows, [(i, j, v) for (i, j), v in zip(batch, scores)], s.samples)
        if not log:  # made with the first whole batch: a reward that fails at once leaves nothing behind
            log.append(open_score_log(folder, s, rank))
        log[0].write(json.dumps({"keys": [keys[ij] for ij in batch], "scores": scores}) + "\n")
        log[0].flush()
        kept.update((keys[ij], v) for ij, v in zip(batch, scores))

    try:
        score_batches(scorer, [rows[i]["prompt"] for i, _ in todo], [rows[i]["responses"][j]["text"] for i, j in todo],
                      s.batch_size, keep, kept=f"the scores before it are kept in {folder.parent} for the next run")
    finally:
        for f in log:
            f.close()
    return {i: [kept[keys[(i, j)]] for j in range(len(rows[i]["responses"]))] for i in indices}


def check_scores(rows: list[dict], scores: list[tuple[int, int, float]], path: str) -> None:
    """Every (row index, response index, score) has a finite score; the first that has not is named."""
    for i, j, value in sorted(scores, key=lambda e: e[:2]):
        if not math.isfinite(value):
            raise UserError(f"{path}: row {i + 1}: response {j + 1} got score {value} (prompt: "
                            f"{json.dumps(rows[i]['prompt'])[:80]}); the reward must be a finite number")


def ranking_score(response: dict, s: Settings) -> float:
    """What the pair rule ranks by: the score minus length_penalty per token (0 but under length_penalised)."""
    return response["score"] - s.length_penalty * response["num_tokens"]


def candidate_pairs(usable: list[dict], index: int, s: Settings) -> list[tuple[dict, dict]]:
    """(chosen, rejected) candidates of one prompt under s.pair_rule; `usable` has at least two responses.
    On equal ranking scores the first response wins, as max() and min() pick it."""
    ranked = sorted(usable, key=lambda r: -ranking_score(r, s))  # stable: the first of equals stays first
    if s.pair_rule == "best_second":
        return [(ranked[0], ranked[1])]
    if s.pair_rule == "best_random":
        best = ranked[0]
        others = [r for r in usable if r is not best]
        return [(best, random.Random(f"{s.seed}:{index}").choice(others))]
    if s.pair_rule == "all_pairs":
        return [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    worst = min(usable, key=lambda r: ranking_score(r, s))  # best_worst, length_penalised
    return [(ranked[0], worst)]


def make_pairs(row: dict, index: int, s: Settings) -> tuple[list[dict], dict[str, int]]:
    """The pairs of one prompt (row `index` of the samples) and what was dropped, by reason: "tie" and
    "below_margin" count candidate pairs, "fewer_than_two" the prompt."""
    usable = [r for r in row["responses"] if (s.keep_unfinished or r["finish_reason"] == "eos") and r["text"].strip()]
    drops = {"tie": 0, "below_margin": 0, "fewer_than_two": 0}
    if len(usable) < 2:
        drops["fewer_than_two"] = 1
        return [], drops
    pairs = []
    for best, worst in candidate_pairs(usable, index, s):
        gap = ranking_score(best, s) - ranking_score(worst, s)
        if gap == 0 or best["text"] == worst["text"]:
            drops["tie"] += 1
        elif gap < s.min_margin:
            drops["below_margin"] += 1
        else:
            pairs.append({"prompt": row["prompt"], "chosen": best["text"], "rejected": worst["text"],
                          "chosen_score": best["score"], "rejected_score": worst["score"],
                          "reward_gap": best["score"] - worst["score"], "chosen_length": best["num_tokens"],
                          "rejected_length": worst["num_tokens"],
                          "length_gap": best["num_tokens"] - worst["num_tokens"],
                          **sampled_token_ids(row, best, worst)})
    return pairs, drops


def check_pair_settings(s: Settings) -> None:
    if not math.isfinite(s.length_penalty) or (s.length_penalty != 0 and s.pair_rule != "length_penalised"):
        raise UserError(f"--length_penalty {s.length_penalty}: it must be finite and is used only by "
                        "--pair_rule length_penalised")


def sampled_token_ids(row: dict, best: dict, worst: dict) -> dict:
    """The pair's sampled token ids and the fingerprint of their vocabulary, when sample.py wrote them:
    dpo.py then trains on the tokens that were sampled, the ones the lengths above count."""
    if "vocab_sha256" not in row or "token_ids" not in best or "token_ids" not in worst:
        return {}
    return {"chosen_token_ids": best["token_ids"], "rejected_token_ids": worst["token_ids"],
            "vocab_sha256": row["vocab_sha256"]}


def correlation(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than two points."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def label_stats(rows: list[dict], pairs: list[dict], drops: dict[str, int], settings: Settings) -> dict:
    """The counts and length signals of label_stats.json. Under all_pairs, dropped_ties and
    dropped_below_margin count candidate pairs (every pair of a prompt's usable responses); under the
    other rules a prompt has one candidate, so they count prompts."""
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
        "pair_rule": settings.pair_rule,
        "pairs_written": len(pairs),
        "prompts_with_pairs": len({json.dumps(p["prompt"]) for p in pairs}),
        "dropped_ties": drops["tie"],
        "dropped_below_margin": drops["below_margin"],
        "dropped_fewer_than_two_usable": drops["fewer_than_two"],
        "dropped_unfinished": 0 if settings.keep_unfinished else sum(r["finish_reason"] == "length" for r in responses),
        "dropped_empty": sum(not r["text"].strip() for r in responses),
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
    if s.batch_size < 1 or s.max_length < 0 or s.min_margin < 0:
        raise UserError("--batch_size must be >= 1, --max_length and --min_margin >= 0")
    check_pair_settings(s)
    check_output_path(out, "--output_dir", directory=True)
    rows = read_jsonl(s.samples, required={"prompt": PROMPT, "responses": list})
    check_rows(rows, s.samples)
    d = setup_distributed()
    scorer = load_scorer(s.reward_fn, s.reward_model, d.device, inference_dtype(s.dtype, d.device, s.compute_dtype),
                         s.batch_size, s.max_length, s.text_format, s.trust_remote_code, flag="reward",
                         compute_dtype=compute_dtype(s.compute_dtype, d.device.type))
    folder = kept_scores_dir(out, s)
    kept = read_kept_scores(folder)
    if kept and d.is_main:
        print(f"label: reusing {len(kept)} scores of an earlier run of this reward, kept in {folder}")
    barrier(d)  # every process has read the logs before any appends to them
    scores = {}
    for part in all_gather_objects(d, score_rows(rows, list(range(d.rank, len(rows), d.world_size)), scorer, s, kept,
                                                 folder, d.rank)):
        scores.update(part)
    rows = [{**row, "responses": [{**r, "score": v} for r, v in zip(row["responses"], scores[i])]}
            for i, row in enumerate(rows)]
    pairs, drops = [], {"tie": 0, "below_margin": 0, "fewer_than_two": 0}
    for i, row in enumerate(rows):
        row_pairs, dropped = make_pairs(row, i, s)
        pairs += row_pairs
        drops = {why: drops[why] + dropped[why] for why in drops}
    stats = label_stats(rows, pairs, drops, s)
    if d.is_main:
        write_jsonl(out / "scores.jsonl", rows)
        atomic_write_text(out / "label_stats.json", json.dumps(stats, indent=1) + "\n")
        save_settings(out, s, name="label_settings.json")
    if not pairs:
        raise UserError(f"{s.samples}: no pair survived ({drops['tie']} ties, {drops['below_margin']} below "
                        f"--min_margin, {drops['fewer_than_two']} with fewer than two usable responses); "
                        f"see {out / 'label_stats.json'}")
    if d.is_main:
        write_jsonl(out / "pairs.jsonl", pairs)  # last but the clean-up: its presence means the stage is done
        shutil.rmtree(folder.parent, ignore_errors=True)
        within = stats["reward_length_correlation_within_prompt"]
        print(f"wrote {out / 'pairs.jsonl'}: {len(pairs)} pairs of {len(rows)} prompts; chosen minus rejected "
              f"length {stats['mean_length_gap']:+.2f} tokens; reward-length correlation within prompt "
              + (f"{within:.2f}" if within is not None else "undefined"))
    barrier(d)
    cleanup_distributed()
    return stats


if __name__ == "__main__":
    run_main(main, (Settings,))
