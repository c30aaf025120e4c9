"""Settings: a dataclass per script, `--config file.yaml` first, then flags. Strict: an unknown key,
a key given twice, a value of the wrong type or a float setting that is not a finite number is an
error naming the file and key or the flag. Bad user input anywhere raises `UserError`, with the file
and line or field in the message; `run_main` turns it into one line on stderr and exit code 2.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path

import yaml


class UserError(Exception):
    """Bad input from the user (file, flag, config): reported as one line, never a traceback."""


def run_main(main, settings_classes, argv=None):
    """Parse settings, call `main(*settings)`, report a UserError as one line and exit 2.

    `settings_classes` is a tuple of dataclasses, or a function of argv returning one (for settings
    whose fields depend on another flag, like dpo.py's loss hyperparameters).
    """
    try:
        if callable(settings_classes):
            settings_classes = settings_classes(list(sys.argv[1:] if argv is None else argv))
        settings = parse_settings(settings_classes, argv)
        return main(*settings)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def setting(default, help: str):
    """A dataclass field with its default and its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _check_type(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    return True  # lists and other containers: argparse converts them


def has_lone_surrogate(value) -> bool:
    """Whether a string in `value` (lists and dicts nested, keys included) holds a lone surrogate, as
    a JSON or YAML escape like "\\ud800" can make: not text, it fails when tokenized or written out."""
    stack, seen = [value], set()  # a loop, not recursion: any depth; `seen`: YAML aliases can make cycles
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(v, (dict, list)) and id(v) not in seen:
            seen.add(id(v))
            stack += [*v.keys(), *v.values()] if isinstance(v, dict) else v
    return False


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (SafeLoader keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                if key.value in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key.value!r} given twice (first on line {first[key.value] + 1})",
                        key.start_mark)
                first[key.value] = key.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str):
    """The data of a YAML file (safe types only); a bad file is a UserError naming it and the line."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_StrictLoader)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{path}: config file not found")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise UserError(f"{path}:{mark.line + 1}: not valid YAML: {e.problem or e.context}")
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}")
    except RecursionError:
        raise UserError(f"{path}: not valid YAML: nested too deeply")
    except ValueError as e:  # an integer of thousands of digits
        raise UserError(f"{path}: not valid YAML: {str(e).split(';')[0]}")
    if has_lone_surrogate(data):
        raise UserError(f"{path}: a string holds a lone surrogate escape (like \\ud800), not text")
    return data


def load_config(path: str, settings_classes) -> dict:
    """Read a YAML config and check every key and value type against the settings dataclasses."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of setting: value")
    hints = {}
    for cls in settings_classes:
        hints.update(typing.get_type_hints(cls))
    for key, value in data.items():
        if key not in hints:
            raise UserError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(hints))})")
        if not _check_type(value, hints[key]):
            raise UserError(f"{path}: key {key!r} should be {hints[key]}, got {value!r}")
    return data


def parse_settings(settings_classes, argv=None):
    """Return one instance per dataclass from `--config FILE` (optional) and command-line flags."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(settings_classes)

    def error(message):  # argparse would print the whole usage first; one line is enough
        raise UserError(f"{message} (see --help)")

    parser.error = error
    parser.add_argument("--config", default=None, help="YAML file of settings; flags override it")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, settings_classes))
    # HfArgumentParser marks fields without defaults as required; set_defaults satisfies them.
    for action in parser._actions:
        if action.required and action.default is not None:
            action.required = False
    args = parser.parse_args(argv)
    out = []
    for cls in settings_classes:
        hints = typing.get_type_hints(cls)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init}
        for k, v in values.items():
            if hints[k] is float and isinstance(v, int) and not isinstance(v, bool):
                values[k] = v = float(v) if abs(v) < 2**1023 else math.inf  # YAML writes 2 for 2.0
            if isinstance(v, float) and not math.isfinite(v):  # NaN would pass every range check
                raise UserError(f"--{k} {v}: not a finite number")
        out.append(cls(**values))
    return tuple(out)

