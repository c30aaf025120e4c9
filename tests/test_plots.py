"""brevity/plots.py: the only module that imports matplotlib, and its figures are whole PNG files."""
from __future__ import annotations

import ast

from conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def test_matplotlib_is_imported_only_by_the_plotting_module():
    importers = []
    for path in sorted(ROOT.rglob("*.py")):
        if "tests" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "matplotlib" for n in names):
                importers.append(str(path.relative_to(ROOT)))
    assert set(importers) == {"brevity/plots.py"}


def test_sweep_figure_is_written_whole_with_no_temporary_left(tmp_path):
    from brevity import plots

    points = [{"method": m, "gold_score": g, "length": 7 + g} for m in ("dpo", "simpo") for g in (0.1, 0.4, 0.6)]
    plots.plot_sweep(points, {"gold_score": 0.3, "length": 7.0}, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
