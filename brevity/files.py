"""Files: JSONL rows in, JSONL and JSON out. Outputs are written to a temporary name in the same
directory and renamed, so a file under its final name is always complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from brevity.config import UserError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write rows as JSONL atomically (temp file + rename)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike, required: dict[str, type | tuple] | None = None) -> list[dict]:
    """Read a JSONL file; any bad line is a UserError naming the file and line number.

    `required` maps field name to the accepted type(s) (`field_problem`); a missing field or a bad
    value is reported. Blank lines are skipped.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found")
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a JSONL file")
    rows = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})")
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for field, types in (required or {}).items():
            if field not in row:
                raise UserError(f"{path}:{lineno}: missing field {field!r}")
            if problem := field_problem(row[field], types):
                raise UserError(f"{path}:{lineno}: field {field!r} {problem}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows (empty file)")
    return rows


TEXT_OR_CHAT = (str, list)  # a prompt or response: a string, or a list of chat messages


def field_problem(value, types) -> str | None:
    """What is wrong with a field that should be of `types` ("has type int", "is empty"), or None.
    A TEXT_OR_CHAT field given as a list must hold {"role": str, "content": str} messages."""
    if not isinstance(value, types):
        return f"has type {type(value).__name__}"
    if isinstance(value, (str, list)) and len(value) == 0:
        return "is empty"
    if types == TEXT_OR_CHAT and isinstance(value, list) and not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return "is a list but not of chat messages {role: string, content: string}"
    return None


def load_rows(data: str, required: dict[str, type | tuple] | None = None, split: str = "train") -> list[dict]:
    """Rows from a JSONL file, a directory saved by `datasets`, or a hub dataset id (via `datasets`)."""
    if data.endswith(".jsonl") or Path(data).is_file():
        return read_jsonl(data, required)
    import datasets

    try:
        ds = datasets.load_from_disk(data) if Path(data).is_dir() else datasets.load_dataset(data, split=split)
    except Exception as e:  # datasets raises many types for a bad path or id
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{data}: not found or cannot load as a dataset ({type(e).__name__}: {first_line})")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{data}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    rows = list(ds)
    for i, row in enumerate(rows):
        for field, types in (required or {}).items():
            if field not in row:
                raise UserError(f"{data}: row {i}: missing field {field!r}")
            if problem := field_problem(row[field], types):
                raise UserError(f"{data}: row {i}: field {field!r} {problem}")
    return rows


def require_input(path: str, default: str, make_it: str) -> None:
    """A default input that does not exist yet: say in one line which command makes it."""
    if path == default and not Path(path).exists():
        raise UserError(f"{path}: not found; run `{make_it}` first")


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

def save_settings(out_dir: str | os.PathLike, *settings, name: str = "settings.json") -> None:
    """Write the resolved settings beside the outputs, so every result says how it was made."""
    merged = {}
    for s in settings:
        merged.update(dataclasses.asdict(s))
    atomic_write_text(Path(out_dir) / name, json.dumps(merged, indent=2, default=str) + "\n")
