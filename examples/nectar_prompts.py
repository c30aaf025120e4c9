r"""Prompts for the Storm-7B recipe (configs/storm7b.env): berkeley-nest/Nectar's prompts as chat messages.

    python examples/nectar_prompts.py --out_dir data/storm7b                     # hub access (datasets)
    python examples/nectar_prompts.py --nectar nectar.jsonl --out_dir data/storm7b   # a local copy

Nectar's `prompt` is a transcript in Anthropic's HH format, "\n\nHuman: ...\n\nAssistant:", ending with
an open assistant turn. Given to sample.py as a plain string, the policy's chat template would wrap
the whole transcript, "Human:" and "Assistant:" included, as one user message. This script turns each
prompt into chat messages (user and assistant turns, ending with the user's), so that the policy's and
the reward model's templates apply as they were trained.

Writes into --out_dir (each file atomically):
- prompts.jsonl {prompt, nectar_index}: prompt as chat messages; nectar_index is the row in Nectar.
  What sample.py reads (run_iterative.sh's PROMPTS).
- data_stats.json: rows read, kept and dropped by reason; settings.json.

Dropped and counted, in this order: a transcript that is not alternating Human/Assistant turns from
a Human one ending with an empty Assistant turn (malformed); a blank user turn (empty); more user
turns than --max_turns (multi_turn; 0 keeps all); a conversation already kept (duplicate). Then, if
--num_prompts is set, a random sample of that many (seeded) is kept, in Nectar's order.

Nectar's documented schema: {"prompt", "answers": [{"answer", "model", "rank"}], "turns",
"num_responses", "source", "good_natured"}; only `prompt` is read.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from brevity.config import UserError, run_main, setting  # noqa: E402
from brevity.files import atomic_write_text, save_settings, write_jsonl  # noqa: E402
from hitchhiker_data import check_row, hh_messages, load_table  # noqa: E402


@dataclasses.dataclass
class Settings:
    out_dir: str = setting("data/storm7b", "gets prompts.jsonl, data_stats.json, settings.json")
    nectar: str = setting("berkeley-nest/Nectar", "Nectar: a hub dataset id, or a local .jsonl or .parquet file "
                                                  "of its rows")
    split: str = setting("train", "hub only: the split")
    max_turns: int = setting(1, "keep prompts with at most this many user turns; 0: all (ours: 1, so that a "
                                "reward format reading the last user turn sees the whole prompt)")
    num_prompts: int = setting(0, "keep a seeded random sample of this many prompts; 0: all")
    seed: int = setting(0, "seed of that sample")


def nectar_prompts(rows: list[dict], max_turns: int = 1, source: str = "Nectar") -> tuple[list[dict], dict]:
    """(rows {prompt: messages, nectar_index}, counts) from Nectar rows; see the module docstring."""
    counts = dict(rows=len(rows), prompts=0, dropped_malformed=0, dropped_empty=0, dropped_multi_turn=0,
                  dropped_duplicate=0)
    out, seen = [], set()
    for i, row in enumerate(rows):
        check_row(row, {"prompt": str}, f"{source}: row {i + 1}")
        text = row["prompt"]
        messages = hh_messages(text if text.startswith("\n\n") else "\n\n" + text)
        if messages is None or messages[-1] != {"role": "assistant", "content": ""}:
            counts["dropped_malformed"] += 1
            continue
        messages = messages[:-1]
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not all(users):
            counts["dropped_empty"] += 1
            continue
        if max_turns and len(users) > max_turns:
            counts["dropped_multi_turn"] += 1
            continue
        key = json.dumps(messages)
        if key in seen:
            counts["dropped_duplicate"] += 1
            continue
        seen.add(key)
        out.append({"prompt": messages, "nectar_index": i})
    counts["prompts"] = len(out)
    return out, counts


def main(s: Settings) -> dict:
    """Convert Nectar's prompts and write them; return the counts (data_stats.json)."""
    if s.max_turns < 0 or s.num_prompts < 0:
        raise UserError("--max_turns and --num_prompts must be >= 0")
    prompts, counts = nectar_prompts(load_table(s.nectar, s.split), s.max_turns, s.nectar)
    if s.num_prompts and s.num_prompts < len(prompts):
        keep = sorted(random.Random(s.seed).sample(range(len(prompts)), s.num_prompts))
        prompts = [prompts[k] for k in keep]
    if not prompts:
        raise UserError(f"{s.nectar}: no prompt left after filtering ({json.dumps(counts)})")
    out = Path(s.out_dir)
    write_jsonl(out / "prompts.jsonl", prompts)
    stats = {"source": s.nectar, **counts, "written": len(prompts)}
    atomic_write_text(out / "data_stats.json", json.dumps(stats, indent=1) + "\n")
    save_settings(out, s)
    print(f"{s.nectar}: {counts['rows']} rows -> {counts['prompts']} prompts (dropped: malformed "
          f"{counts['dropped_malformed']}, empty {counts['dropped_empty']}, more than {s.max_turns or 'any'} user "
          f"turns {counts['dropped_multi_turn']}, duplicate {counts['dropped_duplicate']}); wrote {len(prompts)} to "
          f"{out}/prompts.jsonl")
    return stats


if __name__ == "__main__":
    run_main(main, (Settings,))
