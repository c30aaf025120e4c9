"""Files: JSONL rows in, JSONL and JSON out. Outputs are written to a temporary name in the same
directory and renamed, so a file under its final name is always complete, with the mode an ordinary
write would give it (the umask's). Rows are checked where they are read: the JSON, the fields, the
chat messages (what a valid prompt and a valid response are is defined here, once).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from brevity.config import UserError, has_lone_surrogate


def umask_mode(directory: bool = False) -> int:
    """The mode an ordinary open() or mkdir() gives a new file or directory under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def respect_umask(path: str | os.PathLike) -> None:
    """Give a file, or a directory and everything in it, the ordinary mode: mkstemp, mkdtemp and
    safetensors create theirs private (0600, 0700), which colleagues on a shared machine cannot read."""
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, umask_mode(p.is_dir()))


def check_output_path(path: str | os.PathLike, flag: str, directory: bool) -> None:
    """Before any work: an output file (or directory, if `directory`) can be written at `path`: it
    is not a directory (not a file), and its nearest existing parent is a directory we may write in."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise UserError(f"{flag} {path}: is a {'file' if directory else 'directory'}; expected "
                        f"{'a directory' if directory else 'a file name'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {parent} (permission denied)")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
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


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):  # json keeps the last value of a key given twice, silently
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def parse_json(text: str, where: str):
    """The value of one JSON text; anything wrong with it is a UserError starting with `where`:
    invalid JSON, a key given twice in an object, an integer of thousands of digits, nesting too deep
    for Python's parser, or a lone surrogate escape ("\\ud800", which is not text)."""
    try:
        value = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg}, column {e.colno})")
    except _DuplicateKey as e:
        raise UserError(f"{where}: key {str(e)!r} given twice in one object")
    except ValueError as e:
        raise UserError(f"{where}: invalid JSON ({str(e).split(':')[0]})")
    except RecursionError:
        raise UserError(f"{where}: invalid JSON (nested too deeply)")
    if "\\u" in text and has_lone_surrogate(value):  # a raw surrogate is not valid UTF-8: only escapes make one
        raise UserError(f"{where}: a string holds a lone surrogate escape (like \\ud800), not text")
    return value


def read_json(path: str | os.PathLike):
    """A JSON file this repository wrote (settings, states, results); damage is a UserError naming it."""
    try:
        return parse_json(Path(path).read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})")


def read_jsonl(path: str | os.PathLike, required: dict | None = None) -> list[dict]:
    """Read a JSONL file; any bad line is a UserError naming the file and line number.

    `required` maps field name to its rule (`field_problem`: the accepted type(s), or PROMPT or
    RESPONSE); a missing field or a bad value is reported. Blank lines are skipped.
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
        row = parse_json(text, f"{path}:{lineno}")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        check_fields(row, required, f"{path}:{lineno}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows (empty file)")
    return rows


def check_fields(row: dict, required: dict | None, where: str) -> None:
    for field, rule in (required or {}).items():
        if field not in row:
            raise UserError(f"{where}: missing field {field!r}")
        if problem := field_problem(row[field], rule):
            raise UserError(f"{where}: field {field!r} {problem}")


ROLES = ("system", "user", "assistant")


def _a(role: str) -> str:
    return {"assistant": "an assistant"}.get(role, f"a {role}")


def chat_problem(messages: list, last: str, first: str = "user") -> str | None:
    """What is wrong with chat messages that should end with a `last` turn, or None. A chat is
    {"role", "content"} messages: at most one system message, first, then user and assistant turns
    alternating from a `first` turn (what chat templates accept); every content has text."""
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages):
        return "is a list but not of chat messages {role: string, content: string}"
    for k, m in enumerate(messages, start=1):
        if m["role"] not in ROLES:
            return f"message {k} has role {m['role']!r} (roles: {', '.join(ROLES)})"
        if not m["content"].strip():
            return f"message {k} ({m['role']}) has no text"
    start = 1 if messages[0]["role"] == "system" else 0
    turns = ("user", "assistant") if first == "user" else ("assistant", "user")
    for k, m in enumerate(messages[start:]):
        if m["role"] != turns[k % 2]:
            return (f"message {start + k + 1} is {_a(m['role'])} turn where {_a(turns[k % 2])} turn belongs "
                    f"(an optional system message first, then {first} and {turns[1]} turns alternating)")
    if len(messages) == start:
        return f"has no {first} turn"
    if messages[-1]["role"] != last:
        return f"ends with {_a(messages[-1]['role'])} turn; it must end with {_a(last)} turn"
    return None


def _text_problem(value: str) -> str | None:
    return "is empty" if not value else "is blank (whitespace only)" if not value.strip() else None


def prompt_problem(value) -> str | None:
    """A valid prompt: a string with text, or chat messages ending with a user turn (`chat_problem`)."""
    if isinstance(value, str):
        return _text_problem(value)
    if isinstance(value, list):
        return chat_problem(value, "user") if value else "is empty"
    return f"has type {type(value).__name__}"


def response_problem(value) -> str | None:
    """A valid response: a string with text, or chat messages ending with an assistant turn: the
    assistant's message alone (TRL's conversational format) or the whole conversation."""
    if isinstance(value, list) and value:
        alone = len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant"
        return chat_problem(value, "assistant", first="assistant" if alone else "user")
    return prompt_problem(value)


PROMPT, RESPONSE = prompt_problem, response_problem  # field rules for `required`


def field_problem(value, rule) -> str | None:
    """What is wrong with a field ("has type int", "is empty", "ends with a user turn; ..."), or None.
    `rule` is the accepted type(s) (a string or list must not be empty), or PROMPT or RESPONSE."""
    if not isinstance(rule, (type, tuple)):
        return rule(value)
    if not isinstance(value, rule):
        return f"has type {type(value).__name__}"
    if isinstance(value, (str, list)) and len(value) == 0:
        return "is empty"
    return None


def load_rows(data: str, required: dict | None = None, split: str = "train") -> list[dict]:
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
        check_fields(row, required, f"{data}: row {i}")
    return rows


def rows_fingerprint(rows: list) -> str:
    """A hash of the rows' contents (any JSON values): what a resumed run compares to know its data is
    the same."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


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
