r"""Data for the Hitchhiker's guide recipe (PAPERS.md section 2): PKU-SafeRLHF pairs, HH-RLHF test prompts.

    python examples/hitchhiker_data.py --out_dir data/hitchhiker                   # hub access (datasets)
    python examples/hitchhiker_data.py --pku pku_train.jsonl --hh hh_test.parquet  # local copies

Writes into --out_dir (each file atomically):
- pairs.jsonl {prompt, chosen, rejected}: the PKU-SafeRLHF train pairs, old version (hub revision v0),
  "double safe/unsafe filtered": a pair whose responses are both safe or both unsafe is dropped, so in
  every kept pair exactly one response is safe, and that one is chosen. What dpo.py reads.
- sft.jsonl {prompt, response}: the chosen response of every kept pair, for SFT before preference
  optimisation. What sft.py reads.
- hh_test.jsonl {prompt, chosen}: the Anthropic/hh-rlhf test split, out of distribution. The prompt is
  the chosen transcript up to its final "\n\nAssistant:", as chat messages (so the policy's chat
  template applies); chosen is that final assistant turn, the reference evaluate.py's win rate is
  against. What evaluate.py reads.
- data_stats.json: rows read, kept and dropped (by reason) per source; settings.json.

The sources' documented schemas:
- PKU-SafeRLHF: {"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
  "better_response_id", "safer_response_id"} (booleans; ids 0 or 1). The old version is branch `v0`
  of the hub repository (its README links it), whose train split was round0/train.jsonl.xz in the
  repository's 2023 history; the 2024 re-release on `main` has the same fields and more.
- HH-RLHF: {"chosen", "rejected"}, each a whole transcript "\n\nHuman: ...\n\nAssistant: ..." (the
  two share every turn but the last).
Texts are stripped of surrounding whitespace (HH's turns start with the space after "Human:").
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the brevity package sits one level up
from brevity.config import UserError, run_main, setting  # noqa: E402
from brevity.files import atomic_write_text, read_jsonl, save_settings, write_jsonl  # noqa: E402

PKU_FIELDS = {"prompt": str, "response_0": str, "response_1": str, "is_response_0_safe": bool,
              "is_response_1_safe": bool, "better_response_id": int, "safer_response_id": int}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclasses.dataclass
class Settings:
    out_dir: str = setting("data/hitchhiker", "gets pairs.jsonl, sft.jsonl, hh_test.jsonl, data_stats.json")
    pku: str = setting("PKU-Alignment/PKU-SafeRLHF", "PKU-SafeRLHF: a hub dataset id, or a local .jsonl or "
                                                     ".parquet file of its rows")
    pku_revision: str = setting("v0", "hub only: the revision; v0 is the old version the paper trained on")
    pku_data_files: str = setting("round0/train.jsonl.xz", "hub only: the old version's train file in the "
                                                           "repository; empty: the split as `datasets` finds it")
    pku_split: str = setting("train", "hub only: the split (`datasets` calls a file given by --pku_data_files train)")
    hh: str = setting("Anthropic/hh-rlhf", "HH-RLHF: a hub dataset id, or a local .jsonl or .parquet file of its rows")
    hh_split: str = setting("test", "hub only: the split")


# Conversions: pure functions of the rows.

def check_row(row: dict, fields: dict[str, type], where: str) -> None:
    for field, types in fields.items():
        if field not in row:
            raise UserError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], types) or (types is int and isinstance(row[field], bool)):
            raise UserError(f"{where}: field {field!r} has type {type(row[field]).__name__}, expected {types.__name__}")


def pku_pairs(rows: list[dict], source: str = "PKU-SafeRLHF") -> tuple[list[dict], dict]:
    """(pairs {prompt, chosen, rejected}, counts) from PKU-SafeRLHF rows: keep a row when exactly one
    response is safe, that one chosen. Dropped and counted, in this order: both responses safe, both
    unsafe, a blank prompt or response, identical responses. Of the kept pairs, also counted: the safe
    response is the more helpful one too (better_response_id), and safer_response_id names the unsafe
    one (a label conflict; kept, since the safety labels decide)."""
    counts = dict(rows=len(rows), pairs=0, dropped_both_safe=0, dropped_both_unsafe=0, dropped_empty=0,
                  dropped_identical=0, chosen_is_more_helpful=0, safer_id_names_rejected=0)
    pairs = []
    for i, row in enumerate(rows):
        check_row(row, PKU_FIELDS, f"{source}: row {i + 1}")
        safe = (row["is_response_0_safe"], row["is_response_1_safe"])
        if all(safe):
            counts["dropped_both_safe"] += 1
            continue
        if not any(safe):
            counts["dropped_both_unsafe"] += 1
            continue
        chosen_id = 0 if safe[0] else 1
        prompt = row["prompt"].strip()
        chosen, rejected = row[f"response_{chosen_id}"].strip(), row[f"response_{1 - chosen_id}"].strip()
        if not (prompt and chosen and rejected):
            counts["dropped_empty"] += 1
            continue
        if chosen == rejected:
            counts["dropped_identical"] += 1
            continue
        counts["chosen_is_more_helpful"] += row["better_response_id"] == chosen_id
        counts["safer_id_names_rejected"] += row["safer_response_id"] != chosen_id
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    counts["pairs"] = len(pairs)
    return pairs, counts


def hh_messages(transcript: str) -> list[dict] | None:
    """[{role, content}] of an HH-RLHF transcript, or None unless it is Human and Assistant turns in
    turn, from a Human one, with nothing before the first."""
    parts = HH_TURN.split(transcript)  # [before, role, text, role, text, ...]
    if parts[0].strip() or len(parts) < 3:
        return None
    roles = parts[1::2]
    if any(role != ("Human", "Assistant")[k % 2] for k, role in enumerate(roles)):
        return None
    return [{"role": HH_ROLES[role], "content": text.strip()} for role, text in zip(roles, parts[2::2])]


def hh_prompts(rows: list[dict], source: str = "HH-RLHF") -> tuple[list[dict], dict]:
    """(rows {prompt, chosen}, counts) from HH-RLHF rows: prompt = the chosen transcript's messages
    before its final assistant turn, chosen = that turn's text. Dropped and counted: a transcript
    that is not alternating Human/Assistant turns ending with the assistant's (malformed), and a
    blank final assistant turn or last human turn (empty: nothing to answer, or no reference)."""
    counts = dict(rows=len(rows), prompts=0, dropped_malformed=0, dropped_empty=0)
    out = []
    for i, row in enumerate(rows):
        check_row(row, {"chosen": str}, f"{source}: row {i + 1}")
        messages = hh_messages(row["chosen"])
        if messages is None or messages[-1]["role"] != "assistant":
            counts["dropped_malformed"] += 1
            continue
        if not messages[-1]["content"] or not messages[-2]["content"]:
            counts["dropped_empty"] += 1
            continue
        out.append({"prompt": messages[:-1], "chosen": messages[-1]["content"]})
    counts["prompts"] = len(out)
    return out, counts



def load_table(source: str, split: str, revision: str = "", data_files: str = "") -> list[dict]:
    """Rows of a local .jsonl or .parquet file, or of a split of a hub dataset (via `datasets`)."""
    if source.endswith(".jsonl"):
        return read_jsonl(source)
    import datasets

    try:
        if source.endswith(".parquet"):
            if not Path(source).is_file():
                raise UserError(f"{source}: file not found")
            return list(datasets.load_dataset("parquet", data_files=source, split="train"))
        return list(datasets.load_dataset(source, revision=revision or None, data_files=data_files or None,
                                          split=split))
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for a bad id, revision, file or split
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{source}: cannot load split {split!r} ({type(e).__name__}: {first_line})") from None


def main(s: Settings) -> dict:
    """Convert both sources and write the files; return the counts (data_stats.json)."""
    pairs, pair_counts = pku_pairs(load_table(s.pku, s.pku_split, s.pku_revision, s.pku_data_files), s.pku)
    prompts, prompt_counts = hh_prompts(load_table(s.hh, s.hh_split), s.hh)
    if not pairs or not prompts:
        raise UserError(f"nothing left after filtering: {pair_counts['pairs']} pairs from {s.pku}, "
                        f"{prompt_counts['prompts']} prompts from {s.hh}")
    out = Path(s.out_dir)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "sft.jsonl", [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs])
    write_jsonl(out / "hh_test.jsonl", prompts)
    stats = {"pku": {"source": s.pku, **pair_counts}, "hh": {"source": s.hh, **prompt_counts}}
    atomic_write_text(out / "data_stats.json", json.dumps(stats, indent=1) + "\n")
    save_settings(out, s)
    print(f"{s.pku}: {pair_counts['rows']} rows -> {len(pairs)} pairs (dropped: both safe "
          f"{pair_counts['dropped_both_safe']}, both unsafe {pair_counts['dropped_both_unsafe']}, empty "
          f"{pair_counts['dropped_empty']}, identical {pair_counts['dropped_identical']})\n"
          f"{s.hh}: {prompt_counts['rows']} rows -> {len(prompts)} prompts (dropped: malformed "
          f"{prompt_counts['dropped_malformed']}, empty {prompt_counts['dropped_empty']})\n"
          f"wrote {out}/pairs.jsonl, sft.jsonl, hh_test.jsonl, data_stats.json")
    return stats


if __name__ == "__main__":
    run_main(main, (Settings,))
