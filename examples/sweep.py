"""The Hitchhiker's guide's two findings on the embedded default (PAPERS.md section 2): DPO, LN-DPO and
SimPO trained on the same preference pairs from the same SFT model, then evaluated with the gold scorer.

    python examples/sweep.py --mode table   # each loss at its defaults, 3 seeds: runs/hitchhiker/table.md
    python examples/sweep.py --mode grid    # lr x knob x epochs per loss: runs/hitchhiker/grid.md, grid.png

A driver over the stages, nothing more: every point is `dpo.py` then `evaluate.py`, called in this
process with the argv the command line would get (printed), and each writes its usual directory under
--out_dir, so a rerun skips finished points and a stopped sweep resumes. The pairs are the embedded
offline set (data/embedded/prefs.jsonl: the proxy's best and worst of four demonstrator answers), the
starting model and the reference are the SFT model of `bash run_iterative.sh` (runs/sft); evaluation
reuses one set of SFT responses. table mode reports per loss the mean over seeds of gold score, win
rate vs SFT, length and KL to SFT, each with its standard error over the seeds; grid mode reports each
point and, per loss, the share of grid points whose gold score ends below the SFT model's.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stages sit one level up

import dpo  # noqa: E402
import evaluate  # noqa: E402
from brevity.config import UserError, run_main, setting  # noqa: E402
from brevity.files import atomic_write_text  # noqa: E402

# Per loss: its own knob (beta for DPO and LN-DPO, gamma for SimPO) and the values the grid tries; lr and
# epochs are shared. The defaults (losses.py) are one point of each grid.
KNOBS = {"dpo": ("beta", (0.1, 0.5)), "lndpo": ("beta", (2.0, 8.0)), "simpo": ("gamma", (1.0, 3.0))}
GRID_LRS = (3e-5, 1e-4, 3e-4)
GRID_EPOCHS = (1, 3)
METRICS = ("gold_score", "win_rate_vs_sft", "lc_win_rate_vs_sft", "length", "kl_vs_sft")


@dataclasses.dataclass
class Settings:
    mode: typing.Literal["table", "grid"] = setting("table", "table: each loss at its defaults over --seeds; "
                                                             "grid: lr x knob x epochs per loss, one seed")
    sft_model: str = setting("runs/sft", "the starting policy and reference (bash run_iterative.sh makes it)")
    data: str = setting("data/embedded/prefs.jsonl", "preference pairs")
    prompts: str = setting("data/embedded/eval.jsonl", "held-out evaluation prompts")
    out_dir: str = setting("runs/hitchhiker", "one directory per point below it, and the tables and figure")
    losses: str = setting("dpo,lndpo,simpo", "comma-separated losses.py names")
    seeds: str = setting("0,1,2", "table mode: training seeds")
    lr: float = setting(1e-4, "table mode: learning rate (the loop's)")
    epochs: int = setting(2, "table mode: epochs (the loop's)")
    grid_lrs: str = setting(",".join(map(str, GRID_LRS)), "grid mode: learning rates")
    grid_epochs: str = setting(",".join(map(str, GRID_EPOCHS)), "grid mode: epochs")
    grid_seed: int = setting(0, "grid mode: the training seed of every point")
    max_new_tokens: int = setting(32, "evaluation: response tokens at most (the loop's)")
    gold_fn: str = setting("embedded:gold_score", "evaluation: the gold scorer")


def point_name(loss: str, lr: float, knob: tuple[str, float] | None, epochs: int, seed: int) -> str:
    knob_part = f"_{knob[0]}{knob[1]:g}" if knob else ""
    return f"{loss}_lr{lr:g}{knob_part}_ep{epochs}_seed{seed}"


def points(s: Settings) -> list[dict]:
    """The runs of this mode: {"loss", "lr", "epochs", "seed", "knob": (name, value) or None, "name"}."""
    out = []
    for loss in s.losses.split(","):
        if s.mode == "table":
            runs = [(s.lr, None, s.epochs, int(seed)) for seed in s.seeds.split(",")]
        else:
            if loss not in KNOBS:
                raise UserError(f"--losses: {loss} has no grid knob; known: {', '.join(KNOBS)}")
            name, values = KNOBS[loss]
            runs = [(float(lr), (name, v), int(ep), s.grid_seed) for lr, v, ep in
                    itertools.product(s.grid_lrs.split(","), values, s.grid_epochs.split(","))]
        out += [{"loss": loss, "lr": lr, "knob": knob, "epochs": ep, "seed": seed,
                 "name": point_name(loss, lr, knob, ep, seed)} for lr, knob, ep, seed in runs]
    return out


def run_stage(script: str, main, settings_classes, argv: list[str]):
    print("+ python " + " ".join([script, *argv]), flush=True)
    return run_main(main, settings_classes, argv=argv)


def run_point(p: dict, s: Settings, sft_generations: Path) -> dict:
    """Train and evaluate one point (each stage skips work already on disk); return eval.json."""
    out = Path(s.out_dir) / p["name"]
    knob = ["--" + p["knob"][0], str(p["knob"][1])] if p["knob"] else []
    train = ["--config", str(ROOT / "configs" / "dpo.yaml"), "--model", s.sft_model, "--data", s.data,
             "--output_dir", str(out / "model"), "--loss", p["loss"], "--lr", str(p["lr"]),
             "--epochs", str(p["epochs"]), "--seed", str(p["seed"]), "--resume", *knob]
    run_stage("dpo.py", dpo.main, dpo.settings_classes, train)
    run_stage("evaluate.py", evaluate.main, (evaluate.Settings,), [
        "--model", str(out / "model"), "--sft_model", s.sft_model, "--prompts", s.prompts,
        "--output_dir", str(out / "eval"), "--sft_generations", str(sft_generations),
        "--max_new_tokens", str(s.max_new_tokens), "--gold_fn", s.gold_fn])
    return json.loads((out / "eval" / "eval.json").read_text(encoding="utf-8"))


def mean_and_stderr(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return mean, math.sqrt(var / len(xs))


def table_markdown(results: list[dict], sft: dict) -> str:
    """Per loss, each metric's mean over the seeds with its standard error (over seeds), and the SFT row."""
    lines = ["| loss | seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|",
             "| SFT | - | " + " | ".join(f"{sft[m]:.3f}" for m in METRICS) + " |"]
    for loss in dict.fromkeys(r["loss"] for r in results):
        rows = [r for r in results if r["loss"] == loss]
        cells = [mean_and_stderr([r[m] for r in rows]) for m in METRICS]
        lines.append(f"| {loss} | {len(rows)} | " + " | ".join(f"{m:.3f} ± {e:.3f}" for m, e in cells) + " |")
    return "\n".join(lines) + "\n"


def grid_markdown(results: list[dict], sft: dict) -> str:
    """Every grid point, then per loss the share of points below the SFT model's gold score."""
    lines = ["| loss | lr | knob | epochs | gold | ± | length | KL |", "|---" * 8 + "|"]
    for r in results:
        knob = f"{r['knob'][0]} {r['knob'][1]:g}" if r["knob"] else "-"
        lines.append(f"| {r['loss']} | {r['lr']:g} | {knob} | {r['epochs']} | {r['gold_score']:.3f} | "
                     f"{r['gold_score_stderr']:.3f} | {r['length']:.2f} | {r['kl_vs_sft']:.2f} |")
    lines += ["", f"SFT: gold {sft['gold_score']:.3f}, length {sft['length']:.2f}", "",
              "| loss | points | below SFT | gold median | gold min | length median |", "|---" * 6 + "|"]
    for loss in dict.fromkeys(r["loss"] for r in results):
        golds = [r["gold_score"] for r in results if r["loss"] == loss]
        lengths = [r["length"] for r in results if r["loss"] == loss]
        below = sum(g < sft["gold_score"] for g in golds) / len(golds)
        lines.append(f"| {loss} | {len(golds)} | {below:.0%} | {statistics.median(golds):.3f} | {min(golds):.3f} | "
                     f"{statistics.median(lengths):.2f} |")
    return "\n".join(lines) + "\n"


def main(s: Settings) -> list[dict]:
    """Run every point of the mode, write the table (and the grid's figure); return the results."""
    todo = points(s)
    out = Path(s.out_dir)
    sft_generations = out / "sft_generations.jsonl"
    sft = run_stage("evaluate.py", evaluate.main, (evaluate.Settings,), [
        "--model", s.sft_model, "--sft_model", s.sft_model, "--prompts", s.prompts,
        "--output_dir", str(out / "sft_eval"), "--sft_generations", str(sft_generations),
        "--max_new_tokens", str(s.max_new_tokens), "--gold_fn", s.gold_fn])
    results = [{**run_point(p, s, sft_generations), **p} for p in todo]  # the point's seed, not eval's
    text = (table_markdown if s.mode == "table" else grid_markdown)(results, sft)
    atomic_write_text(out / f"{s.mode}.md", text)
    atomic_write_text(out / f"{s.mode}.json", json.dumps(
        [{k: r[k] for k in ("name", "loss", "lr", "knob", "epochs", "seed", *METRICS, "gold_score_stderr")}
         for r in results], indent=1) + "\n")
    print(text, end="")
    if s.mode == "grid":
        from brevity import plots

        plots.plot_sweep([{"method": r["loss"], **r} for r in results], sft, out / "grid.png")
        print(f"wrote {out / 'grid.png'}")
    return results


if __name__ == "__main__":
    run_main(main, (Settings,))
