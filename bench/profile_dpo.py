"""Where dpo.py's time goes: the model and pairs of bench/dpo_vs_trl.py, one dpo.py run in this process
under torch.profiler, its CPU operator time grouped by kind.

    python bench/profile_dpo.py                                # 16.8M Llama, dpo.py's default compute (auto)
    python bench/profile_dpo.py --compute_dtype float32        # the same in float32
    python bench/profile_dpo.py --size 135m --steps 4          # SmolLM2-135M-shaped

The run is dpo_vs_trl.py's `ours` (the same flags, the same data), so the whole run is profiled: the
reference pass, every training step, the loading. Self CPU time (an operator's own time, without its
children's) is summed by kind: matrix multiplies, attention, the float32 log-softmax, autocast's
casts and copies, AdamW, norms and the other elementwise work; then the 15 most expensive operators.
The profiler costs some speed of its own, so the wall time here is above the benchmark's.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ["TQDM_DISABLE"] = "1"

from brevity.config import run_main  # noqa: E402

KINDS = (  # the first kind whose name fragment is in the operator's name
    ("matrix multiplies", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("log-softmax", ("log_softmax",)),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("AdamW", ("adam",)),
    ("norms", ("rsqrt", "aten::pow", "aten::mean", "norm")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::neg", "aten::cat",
                     "aten::sigmoid", "aten::exp", "aten::where", "aten::fill_", "aten::zero_", "aten::sum")),
)


@dataclasses.dataclass
class ProfileSettings:
    size: Literal["tiny", "135m"] = "tiny"  # model shape (dpo_vs_trl.SIZES)
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    steps: int = 10  # training steps (no warm-up is left out: the profile covers the whole run)
    batch_size: int = 8
    threads: int = 2
    work_dir: str = "runs/profile_dpo"  # rebuilt on every call


def kind_of(name: str) -> str:
    return next((kind for kind, parts in KINDS if any(p in name for p in parts)), "other")


def main(s: ProfileSettings) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import dpo
    import dpo_vs_trl

    for name in ("steps", "batch_size", "threads"):
        if getattr(s, name) < 1:
            raise SystemExit(f"--{name} {getattr(s, name)}: need >= 1")
    torch.set_num_threads(s.threads)
    work = dpo_vs_trl.rebuild_work_dir(s.work_dir, "bench/profile_dpo.py")
    bench = dpo_vs_trl.BenchSettings(size=s.size, steps=s.steps, warmup=0, batch_size=s.batch_size)
    info = dpo_vs_trl.prepare(bench, work)
    argv = dpo_vs_trl.dpo_command(bench, work, work / "ours", s.compute_dtype)[2:]  # without python, dpo.py
    print(f"model: {s.size}, {info['params']:,} parameters; python dpo.py {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_main(dpo.main, dpo.settings_classes, argv=argv)
    wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    print(f"\nwall {wall:.1f} s under the profiler; operator self CPU time {total / 1e6:.1f} s "
          f"(all threads' operators, so it can differ from the wall time)\n")
    print("| kind | self CPU s | share |\n|---|---|---|")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t / 1e6:.2f} | {t / total:.1%} |")
    print("\n| operator | calls | self CPU s | share |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.1%} |")


if __name__ == "__main__":
    run_main(main, (ProfileSettings,))
