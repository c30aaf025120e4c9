"""An optional experiment tracker: Weights & Biases, when --wandb_project names a project (off by
default). wandb is imported only then (pip install wandb), so nothing else needs it; WANDB_MODE=offline
logs to local files without network (`wandb sync` uploads them later). A run is named after its output
directory and keeps one id per directory, so a resumed training run continues the same tracked run.
Only the main process logs; the others, and every process when tracking is off, hold a Tracker that
does nothing.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

from brevity.config import UserError


def check_tracker(project: str) -> None:
    """Refuse --wandb_project before any work when wandb is not installed."""
    if project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb_project: wandb is not installed (pip install wandb), or leave the flag out")


def numbers(values: dict) -> dict[str, float]:
    """The finite numeric entries of a metrics row (wandb charts numbers; flags and strings stay in the files)."""
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    def __init__(self, run=None):
        self.run = run

    def log(self, values: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(numbers(values), step=step)

    def finish(self, summary: dict | None = None) -> None:
        if self.run is not None:
            self.run.summary.update(numbers(summary or {}))
            self.run.finish()
            self.run = None


def start_tracker(project: str, output_dir: str, config: dict, is_main: bool) -> Tracker:
    """A tracked run in `project` named `output_dir` (with `config` as its settings), or a no-op Tracker."""
    if not project or not is_main:
        return Tracker()
    check_tracker(project)
    import wandb

    run_id = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
    return Tracker(wandb.init(project=project, name=output_dir, id=run_id, resume="allow", config=config))
