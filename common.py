"""What every brevity script needs: settings, files, distributed setup, models and tokenization.

Stages talk through files (JSONL, Hugging Face model directories); this module only holds the
pieces that two or more scripts share. Bad user input raises `UserError` with the file and line or
field in the message; `run_main` turns it into one line on stderr and exit code 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import typing
from pathlib import Path

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user (file, flag, config): reported as one line, never a traceback."""


def run_main(main, settings_classes, argv=None):
    """Parse settings, call `main(*settings)`, report a UserError as one line and exit 2."""
    try:
        settings = parse_settings(settings_classes, argv)
        return main(*settings)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# Settings: a dataclass per script; `--config file.yaml` first, then flags override. Strict: an
# unknown key or a value of the wrong type is an error naming the file and key.

def _check_type(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
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


def load_config(path: str, settings_classes) -> dict:
    """Read a YAML config and check every key and value type against the settings dataclasses."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found")
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}")
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
        for k, v in values.items():  # YAML writes 2 for 2.0; keep float settings float
            if hints[k] is float and isinstance(v, int) and not isinstance(v, bool):
                values[k] = float(v)
        out.append(cls(**values))
    return tuple(out)


def save_settings(out_dir: str | os.PathLike, *settings, name: str = "settings.json") -> None:
    """Write the resolved settings beside the outputs, so every result says how it was made."""
    merged = {}
    for s in settings:
        merged.update(dataclasses.asdict(s))
    atomic_write_text(Path(out_dir) / name, json.dumps(merged, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# Files. Outputs are written to a temporary name in the same directory and renamed, so a file
# under its final name is always complete.

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

    `required` maps field name to the accepted type(s); a missing field, a value of another type,
    or an empty string is reported. Blank lines are skipped.
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
            if not isinstance(row[field], types):
                raise UserError(f"{path}:{lineno}: field {field!r} has type {type(row[field]).__name__}")
            if isinstance(row[field], (str, list)) and len(row[field]) == 0:
                raise UserError(f"{path}:{lineno}: field {field!r} is empty")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows (empty file)")
    return rows


def load_rows(data: str, required: dict[str, type | tuple] | None = None, split: str = "train") -> list[dict]:
    """Rows from a JSONL file, a directory saved by `datasets`, or a hub dataset id (via `datasets`)."""
    if data.endswith(".jsonl") or Path(data).is_file():
        return read_jsonl(data, required)
    import datasets

    try:
        ds = datasets.load_from_disk(data) if Path(data).is_dir() else datasets.load_dataset(data, split=split)
    except Exception as e:  # datasets raises many types for a bad path or id
        raise UserError(f"{data}: cannot load as a dataset ({type(e).__name__}: {e})")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{data}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    rows = list(ds)
    for i, row in enumerate(rows):
        for field, types in (required or {}).items():
            if field not in row or not isinstance(row[field], types):
                raise UserError(f"{data}: row {i}: missing or mistyped field {field!r}")
    return rows


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# Distributed: the same code runs under `python` (one process) and `torchrun` (many).

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Initialise torch.distributed from torchrun's environment: NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local, device)


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(d: Dist, obj):
    """Gather a picklable object from every rank; returns the list on every rank."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Models and tokenizers: a hub id or a local Hugging Face directory. Weights only from safetensors;
# remote code only when asked for.

def check_model_dir(path: str) -> None:
    """A local model directory must hold a config and safetensors weights."""
    p = Path(path)
    if not p.exists():
        return  # a hub id; transformers resolves it (offline here, so it will fail loudly)
    if not p.is_dir():
        raise UserError(f"{path}: expected a model directory, found a file")
    if not (p / "config.json").exists():
        raise UserError(f"{path}: no config.json, not a Hugging Face model directory")
    if not any(p.glob("*.safetensors")):
        raise UserError(f"{path}: no *.safetensors weights (only safetensors are loaded)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"{name_or_path}: cannot load tokenizer ({str(e).splitlines()[0]})")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"{name_or_path}: tokenizer has no eos_token; responses could never end")
    return tok


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               model_class=None):
    """Load a causal LM (or `model_class`) from safetensors only, in eval mode (dropout off)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(name_or_path)
    cls = model_class or AutoModelForCausalLM
    try:
        model = cls.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True,
                                    trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"{name_or_path}: cannot load model ({str(e).splitlines()[0]})")
    return model.eval()


def save_hf_model(model, tokenizer, out_dir: str | os.PathLike, state_dict=None, extra_files: dict | None = None) -> None:
    """Save config + tokenizer + safetensors into `out_dir` atomically (temp dir, then rename).

    Call on rank 0 only, with a full (gathered) `state_dict` when the model is sharded.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if out_dir.exists():  # replace an older copy: move it aside first, so one is always whole
            old = out_dir.with_name(f".{out_dir.name}.old")
            _rmtree(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            _rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        _rmtree(tmp)
        raise


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Tokenization. A prompt is a string or a list of chat messages; a response is a string or a
# one-message list (TRL's conversational preference format). The prompt is encoded once, the
# response separately, and the sequence is their concatenation: chosen and rejected share the very
# same prompt ids, and no token can straddle the boundary, so the response mask is exact.

def prompt_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def response_text(response) -> str:
    """The text of a response given as a string or as a list of messages (the assistant's turn)."""
    if isinstance(response, str):
        return response
    if isinstance(response, list) and response and isinstance(response[-1], dict):
        return response[-1].get("content", "")
    raise UserError(f"response must be a string or a list of messages, got {type(response).__name__}")


def prompt_user_text(prompt) -> str:
    """The last user message of a prompt (what a reward function reads as the instruction)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def format_prompt(tokenizer, prompt) -> str:
    """The text the model is conditioned on: the chat template with a generation prompt if the
    tokenizer has one, else the plain prompt string."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise UserError("prompt given as chat messages but the tokenizer has no chat template")
    return prompt


def encode_prompt(tokenizer, prompt) -> list[int]:
    # The chat template already holds any BOS it wants; a plain prompt gets the tokenizer's specials.
    text = format_prompt(tokenizer, prompt)
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def encode_response(tokenizer, response) -> list[int]:
    """Response token ids followed by EOS (the model is trained to stop)."""
    ids = tokenizer(response_text(response), add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def pad_batch(sequences: list[list[int]], response_masks: list[list[int]], pad_id: int):
    """Right-pad token lists into `input_ids`, `attention_mask`, `response_mask`, each [B, T] long."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids)
    for i, (seq, mask) in enumerate(zip(sequences, response_masks)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        resp[i, : len(mask)] = torch.tensor(mask)
    return ids, attn, resp


# ---------------------------------------------------------------------------------------------
# Per-sequence log-probabilities. logp(y) = sum over response tokens of log pi(y_t | x, y_<t), in
# float32, computed chunk by chunk over the sequence so that no [B, T, V] float32 tensor exists.

def _chunk_token_logps(lm_head, hidden, targets):
    logits = lm_head(hidden).float()
    return torch.gather(logits.log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def token_logps(model, input_ids, attention_mask, position_ids=None, chunk_size: int = 256,
                checkpoint_chunks: bool | None = None):
    """log pi(input_ids[:, t] | input_ids[:, :t]) for t >= 1, as a float32 [B, T-1] tensor.

    The decoder runs once; the LM head and log-softmax run on `chunk_size` positions at a time.
    Under autograd each chunk is recomputed in backward (activation checkpointing), so only one
    chunk's logits are alive at any moment.
    """
    from torch.utils.checkpoint import checkpoint

    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False).last_hidden_state
    hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    lm_head = model.get_output_embeddings()
    if checkpoint_chunks is None:
        checkpoint_chunks = torch.is_grad_enabled()
    out = []
    for start in range(0, hidden.shape[1], chunk_size):
        h, t = hidden[:, start:start + chunk_size], targets[:, start:start + chunk_size]
        if checkpoint_chunks:
            out.append(checkpoint(_chunk_token_logps, lm_head, h, t, use_reentrant=False))
        else:
            out.append(_chunk_token_logps(lm_head, h, t))
    return torch.cat(out, dim=1)


def sequence_logps(model, input_ids, attention_mask, response_mask, position_ids=None, chunk_size: int = 256):
    """Sum of response-token log-probs per sequence, float32 [B]; `response_mask` marks the tokens
    of `input_ids` that belong to the response (EOS included)."""
    logps = token_logps(model, input_ids, attention_mask, position_ids, chunk_size)
    return (logps * response_mask[:, 1:].to(logps.dtype)).sum(-1)
