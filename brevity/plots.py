"""Figures: the loop's metrics per iteration, the robustness sweep, the 3D-properties toy.

The only module that imports matplotlib (the Agg backend: files, no window). Every figure is written
to a temporary name and renamed, so a reader never sees half a PNG.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_png(fig, path: str | os.PathLike) -> None:
    """Write `fig` as a PNG at `path` atomically and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


ITERATION_PANELS = (("gold score", "gold_score", "gold_score_stderr"),
                    ("LC win rate vs SFT", "lc_win_rate_vs_sft", None),
                    ("length (tokens)", "length", None))


def plot_iterations(tables: dict[str, list[dict]], path: str | os.PathLike) -> None:
    """Gold score (with one standard error), LC win rate vs SFT and mean length against the iteration,
    one line per run. `tables`: run name -> evaluate.summarize's rows (dicts with `iteration` and the
    eval.json keys)."""
    fig, axes = plt.subplots(1, len(ITERATION_PANELS), figsize=(4.2 * len(ITERATION_PANELS), 3.4))
    for name, rows in tables.items():
        its = [r["iteration"] for r in rows]
        for ax, (title, key, err) in zip(axes, ITERATION_PANELS):
            values = [r.get(key, float("nan")) for r in rows]
            errors = [r.get(err, 0.0) for r in rows] if err else None
            ax.errorbar(its, values, yerr=errors, marker="o", capsize=3, label=name)
    for ax, (title, _, _) in zip(axes, ITERATION_PANELS):
        ax.set_title(title)
        ax.set_xlabel("iteration (0: SFT)")
        ax.set_xticks(sorted({r["iteration"] for rows in tables.values() for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].legend()
    save_png(fig, path)


def plot_sweep(points: list[dict], sft: dict, path: str | os.PathLike) -> None:
    """The robustness sweep: per method, the gold score and the length of every grid point (one dot
    each, over a box plot), the SFT model's as a dashed line, and in the title the share of grid
    points whose gold ends below SFT's. `points`: dicts with `method`, `gold_score`, `length`;
    `sft`: {"gold_score", "length"}."""
    methods = list(dict.fromkeys(p["method"] for p in points))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "gold_score", "gold score"), (axes[1], "length", "length (tokens)")):
        values = [[p[key] for p in points if p["method"] == m] for m in methods]
        ax.boxplot(values, showfliers=False)
        for i, v in enumerate(values, start=1):
            ax.scatter([i + 0.08 * ((j % 5) - 2) for j in range(len(v))], v, s=12, alpha=0.7, zorder=3)
        ax.axhline(sft[key], color="gray", linestyle="--", label="SFT")
        ax.set_xticks(range(1, len(methods) + 1), methods)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    below = [sum(p["gold_score"] < sft["gold_score"] for p in points if p["method"] == m) /
             max(1, sum(p["method"] == m for p in points)) for m in methods]
    axes[0].legend()
    fig.suptitle("grid points below SFT's gold: " + ", ".join(f"{m} {b:.0%}" for m, b in zip(methods, below)),
                 y=1.02)  # above the panels' own titles
    save_png(fig, path)


def plot_curves(curves: dict[str, dict[str, list[float]]], panels: tuple[str, ...], path: str | os.PathLike,
                xlabel: str = "step") -> None:
    """One panel per name in `panels`, one line per entry of `curves` (name -> {panel: values})."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for name, values in curves.items():
        for ax, panel in zip(axes, panels):
            ax.plot(values[panel], label=name)
    for ax, panel in zip(axes, panels):
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    save_png(fig, path)
