"""What every brevity script needs: settings, files, distributed setup, models and tokenization.

Stages talk through files (JSONL, Hugging Face model directories); this module only holds the
pieces that two or more scripts share. Bad user input raises `UserError` with the file and line or
field in the message; `run_main` turns it into one line on stderr and exit code 2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import typing
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


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
    except Exception as e:  # OSError: no files; ValueError: bad JSON; KeyError etc.: a damaged tokenizer.json
        first = (str(e).strip().splitlines() or [''])[0]
        raise UserError(f"{name_or_path}: cannot load tokenizer ({type(e).__name__}: {first})")
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
    except (OSError, ValueError) as e:  # ValueError: e.g. custom code, refused without trust_remote_code
        hint = ("; it needs its own code, run only with --trust_remote_code (for models you trust)"
                if "trust_remote_code" in str(e) and not trust_remote_code else "")
        raise UserError(f"{name_or_path}: cannot load model ({(str(e).strip().splitlines() or [''])[0]}){hint}")
    return model.eval()


def save_hf_model(model, tokenizer, out_dir: str | os.PathLike, state_dict=None, extra_files: dict | None = None) -> None:
    """Save config + tokenizer + safetensors into `out_dir` atomically (temp dir, then rename).

    Call on rank 0 only, with a full (gathered) `state_dict` when the model is sharded.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary shared directory
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():  # text, or bytes copied as they are
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
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


def clean_interrupted_save(out_dir: str | os.PathLike) -> None:
    """Undo what a kill inside `save_hf_model` left: its temporary copy goes, and if the kill fell
    between its two renames (out_dir moved aside, the new copy not yet in place), the old copy
    comes back, so out_dir is as it was before the save."""
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.is_dir() and not out_dir.exists():
        os.replace(old, out_dir)
    _rmtree(old)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        _rmtree(tmp)


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


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device=None):
    """Right-padded `input_ids`, `attention_mask`, `response_mask` [B, T] for (prompt ids, response
    ids) pairs; the response mask is 1 exactly on the response's ids."""
    ids, attn, resp = pad_batch([p + r for p, r in examples], [[0] * len(p) + [1] * len(r) for p, r in examples],
                                pad_id)
    return ids.to(device), attn.to(device), resp.to(device)


# ---------------------------------------------------------------------------------------------
# Per-sequence log-probabilities. logp(y) = sum over response tokens of log pi(y_t | x, y_<t), in
# float32, computed chunk by chunk so that no [B, T, V] float32 tensor exists.

def _chunk_token_logps(lm_head, hidden, targets):
    # logit[target] - logsumexp(logits) == log_softmax(logits)[target], without a second [N, V] tensor
    logits = lm_head(hidden).float()
    return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _chunked_logps(lm_head, hidden, targets, chunk_size: int, checkpoint_chunks: bool):
    """`_chunk_token_logps` over the positions (dim -2) of [B, T, H] or [N, H] hidden states, a chunk
    at a time. Under autograd each chunk's logits are recomputed in backward (activation
    checkpointing), so only one chunk's logits are ever alive."""
    from torch.utils.checkpoint import checkpoint

    dim = hidden.dim() - 2
    out = []
    for start in range(0, hidden.shape[dim], chunk_size):
        width = min(chunk_size, hidden.shape[dim] - start)
        h, t = hidden.narrow(dim, start, width), targets.narrow(dim, start, width)
        if checkpoint_chunks:
            out.append(checkpoint(_chunk_token_logps, lm_head, h, t, use_reentrant=False))
        else:
            out.append(_chunk_token_logps(lm_head, h, t))
    return torch.cat(out, dim=dim) if out else hidden.new_zeros(targets.shape, dtype=torch.float32)


def token_logps(model, input_ids, attention_mask, position_ids=None, chunk_size: int = 256,
                checkpoint_chunks: bool | None = None):
    """log pi(input_ids[:, t] | input_ids[:, :t]) for t >= 1, as a float32 [B, T-1] tensor.

    The decoder runs once; the LM head and log-softmax run on `chunk_size` positions at a time.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False).last_hidden_state
    if checkpoint_chunks is None:
        checkpoint_chunks = torch.is_grad_enabled()
    return _chunked_logps(model.get_output_embeddings(), hidden[:, :-1], input_ids[:, 1:], chunk_size,
                          checkpoint_chunks)


def sequence_logps(model, input_ids, attention_mask, response_mask, position_ids=None, chunk_size: int = 1024):
    """Sum of response-token log-probs per sequence, float32 [B]; `response_mask` [B, T] marks the
    tokens of `input_ids` that belong to the response (EOS included).

    The LM head runs only where the next token is a response token: those hidden states are packed
    into [N, H] (N = response tokens in the batch) and go through the head `chunk_size` tokens at a
    time, so prompt and padding positions cost no LM-head work and the peak is chunk_size x V floats.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False).last_hidden_state
    predicts_response = response_mask[:, 1:].bool()  # hidden state t predicts token t + 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(predicts_response)
    logps = _chunked_logps(model.get_output_embeddings(), hidden[:, :-1][predicts_response],
                           input_ids[:, 1:][predicts_response], chunk_size, torch.is_grad_enabled())
    return logps.new_zeros(input_ids.shape[0]).index_add(0, rows[predicts_response], logps)


# ---------------------------------------------------------------------------------------------
# Training: what sft.py and dpo.py share. The policy is wrapped in `SequenceLogps`, whose forward
# returns per-sequence response log-probs; under torchrun `wrap_policy` shards it with FSDP2, and
# every other line of a training loop is the same on one process or many.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def setting(default, help: str):
    """A dataclass field with its default and its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainSettings:
    """The knobs of every training script; sft.py and dpo.py subclass it and change some defaults."""
    model: str = setting("", "starting model: a local Hugging Face directory or a hub id")
    data: str = setting("", "training data: a JSONL file, a directory saved by `datasets`, or a hub dataset id")
    output_dir: str = setting("", "gets the trained model (a Hugging Face directory), settings.json, metrics.jsonl, "
                                  "data_stats.json; checkpoints while training")
    seed: int = setting(0, "seed of the data order")
    resume: bool = setting(False, "continue from the last checkpoint in output_dir, if there is one")
    epochs: int = setting(1, "passes over the data")
    max_steps: int = setting(-1, "optimizer steps (cycling through the data); -1: as many as `epochs` give")
    batch_size: int = setting(64, "examples (pairs, for dpo.py) per optimizer step, over all processes")
    grad_accum: int = setting(1, "micro-steps per optimizer step; a micro-batch is "
                                 "batch_size / (processes * grad_accum)")
    lr: float = setting(1e-5, "peak learning rate (AdamW, betas 0.9/0.999)")
    lr_schedule: typing.Literal["constant", "linear", "cosine"] = setting(
        "cosine", "after warm-up: constant, or a linear or cosine decay to 0 at the last step")
    warmup_steps: int = setting(0, "linear warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this; 0: no clipping")
    max_length: int = setting(1024, "at most this many tokens per sequence: prompt + response + EOS")
    max_prompt_length: int = setting(-1, "longer prompts lose tokens from the left (their end matters most); "
                                         "-1: half of max_length")
    truncate_responses: bool = setting(False, "cut a response that would pass max_length, instead of dropping "
                                              "its example")
    bucket_batches: int = setting(32, "length bucketing: a shuffled epoch is sorted by length within windows of "
                                      "this many batches, then the batches are shuffled; 1: within a batch only")
    save_every: int = setting(200, "write a resumable checkpoint every this many steps (only the last is kept); "
                                   "0: never")
    dtype: typing.Literal["float32", "bfloat16"] = setting(
        "float32", "parameter dtype, also of the saved model; on GPU the compute runs in bfloat16 either way")
    activation_checkpointing: bool = setting(True, "recompute each decoder layer in backward: about half the "
                                                   "memory for a fifth more time (on, as in TRL); false: faster")
    chunk_size: int = setting(1024, "response tokens per LM-head chunk; the log-prob peak is chunk_size x vocab floats")
    trust_remote_code: bool = setting(False, "run model/tokenizer code from the hub (only for models you trust)")

    def __post_init__(self):
        if self.max_prompt_length == -1:
            self.max_prompt_length = self.max_length // 2


def check_train_settings(s: TrainSettings, d: Dist) -> None:
    if s.batch_size < 1 or s.grad_accum < 1 or s.batch_size % (d.world_size * s.grad_accum):
        raise UserError(f"--batch_size {s.batch_size} must be a positive multiple of processes x --grad_accum "
                        f"({d.world_size} x {s.grad_accum})")
    if not 0 < s.max_prompt_length < s.max_length:
        raise UserError(f"need 0 < --max_prompt_length ({s.max_prompt_length}) < --max_length ({s.max_length})")
    if s.epochs < 1 and s.max_steps < 1:
        raise UserError("need --epochs >= 1 or --max_steps >= 1")
    if not 0 < s.lr < 1e30:  # nan and inf too; AdamW's first step, lr / (1 - 0.9), must fit in float32
        raise UserError(f"--lr {s.lr}: need 0 < lr < 1e30")
    if not (0 <= s.weight_decay < math.inf and 0 <= s.max_grad_norm < math.inf):
        raise UserError(f"--weight_decay {s.weight_decay}, --max_grad_norm {s.max_grad_norm}: need finite values >= 0")


def require_input(path: str, default: str, make_it: str) -> None:
    """A default input that does not exist yet: say in one line which command makes it."""
    if path == default and not Path(path).exists():
        raise UserError(f"{path}: not found; run `{make_it}` first")


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """`encode_prompt` for many prompts in one tokenizer call."""
    if not prompts:
        return []
    texts = [format_prompt(tokenizer, p) for p in prompts]
    return tokenizer(texts, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def encode_responses(tokenizer, responses) -> list[list[int]]:
    """`encode_response` for many responses in one tokenizer call."""
    if not responses:
        return []
    ids = tokenizer([response_text(r) for r in responses], add_special_tokens=False)["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids]


def fit_to_length(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
                  truncate_responses: bool):
    """(prompt, responses, prompt_was_cut, responses_were_cut), or None to drop the example.

    A prompt longer than max_prompt_length loses tokens from the left. A response that would pass
    max_length is cut on the right if truncate_responses, else the example is dropped (a cut
    response has no EOS: training on it teaches the model not to stop).
    """
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_length - len(prompt)
    responses_cut = any(len(r) > room for r in responses)
    if responses_cut:
        if not truncate_responses:
            return None
        responses = [r[:room] for r in responses]
    return prompt, responses, prompt_cut, responses_cut


def count_steps(n_examples: int, s: TrainSettings) -> tuple[int, int]:
    """(steps per epoch, total steps); a last partial batch of an epoch is dropped."""
    per_epoch = n_examples // s.batch_size
    if per_epoch == 0:
        raise UserError(f"{s.data}: {n_examples} usable examples, fewer than one batch (--batch_size {s.batch_size})")
    return per_epoch, (s.max_steps if s.max_steps > 0 else s.epochs * per_epoch)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket_batches: int) -> list[list[int]]:
    """One epoch's global batches of example indices: a function of (lengths, seed, epoch) only, so
    every process, and a run on any number of processes, sees the same batches.

    The epoch is shuffled and cut into windows of `bucket_batches` batches; each window is sorted by
    length and cut into batches (a batch holds similar lengths, so padding stays small), and the
    batch order is shuffled. Each batch comes out sorted by length. A last partial batch is dropped.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[: len(order) // batch_size * batch_size]
    window = batch_size * max(1, bucket_batches)
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def global_batches(lengths: list[int], s: TrainSettings, start_step: int, total_steps: int):
    """Yield (step, global batch) for steps start_step .. total_steps - 1, cycling through epochs."""
    per_epoch = len(lengths) // s.batch_size
    batches = None
    for step in range(start_step, total_steps):
        epoch, i = divmod(step, per_epoch)
        if batches is None or i == 0:
            batches = epoch_batches(lengths, s.batch_size, s.seed, epoch, s.bucket_batches)
        yield step, batches[i]


def micro_batches(batch: list[int], world_size: int, rank: int, grad_accum: int) -> list[list[int]]:
    """This process's micro-batches of a (length-sorted) global batch, one per micro-step: the batch
    is cut into world_size x grad_accum contiguous pieces and micro-step a of rank r takes piece
    a * world_size + r, so the processes of one micro-step get similar lengths."""
    size = len(batch) // (world_size * grad_accum)
    pieces = [batch[i * size:(i + 1) * size] for i in range(world_size * grad_accum)]
    return [pieces[a * world_size + rank] for a in range(grad_accum)]


def lr_at(step: int, s: TrainSettings, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (from 0): linear warm-up, then the schedule. A pure
    function of the step, so the step is all of the scheduler's state a checkpoint needs."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps)
    if s.lr_schedule == "linear":
        return s.lr * (1 - progress)
    if s.lr_schedule == "cosine":
        return s.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return s.lr


class SequenceLogps(torch.nn.Module):
    """A causal LM whose forward returns per-sequence response log-probs, float32 [B]
    (`sequence_logps`).

    Why a module: `sequence_logps` calls the decoder and the LM head directly, never the LM's own
    forward, so under FSDP2 the LM's root parameters (embeddings, final norm, LM head) must belong
    to a module whose forward does run, for its hooks to gather them: this one, sharded as the root.
    """

    def __init__(self, model, chunk_size: int = 1024, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast_dtype

    def forward(self, input_ids, attention_mask, response_mask):
        autocast = (torch.autocast(input_ids.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            return sequence_logps(self.model, input_ids, attention_mask, response_mask, chunk_size=self.chunk_size)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (the classes in its `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"{type(model).__name__}: cannot find its decoder layers (no _no_split_modules)")
    return layers


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def wrap_policy(model, d: Dist, chunk_size: int = 1024, activation_checkpointing: bool = False) -> SequenceLogps:
    """`model` on d.device, wrapped for training. Under torchrun, FSDP2: `fully_shard` on every
    decoder layer, then on the wrapper as the root (embeddings, final norm, LM head), with bf16
    compute and fp32 gradient reduction on GPU. One process: the bare model (bf16 autocast on GPU).

    The model stays in eval mode: dropout is off while training, so the policy's log-probs are the
    same function the reference log-probs were computed with.
    """
    model.to(d.device).eval()
    if activation_checkpointing:  # the forward is wrapped in place: parameter names stay as they are
        for layer in decoder_layers(model):
            layer.forward = _checkpointed(layer.forward)
    cuda = d.device.type == "cuda"
    if d.world_size == 1:
        fp32 = next(model.parameters()).dtype == torch.float32
        return SequenceLogps(model, chunk_size, torch.bfloat16 if cuda and fp32 else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else \
        MixedPrecisionPolicy()
    policy = SequenceLogps(model, chunk_size)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    return policy


def set_gradient_sync(policy, enabled: bool) -> None:
    """FSDP2 reduce-scatters gradients only on the last micro-step of a step; no-op on one process."""
    if hasattr(policy, "set_requires_gradient_sync"):
        policy.set_requires_gradient_sync(enabled)


def reshard(policy) -> None:
    """After a forward without backward (a no-grad pass), FSDP2 leaves the root's parameters gathered
    and registered in place of the sharded ones; put the sharded ones back (what an optimizer must
    hold). No-op on one process."""
    if hasattr(policy, "reshard"):
        policy.reshard()


def clip_grad_norm(policy, max_norm: float) -> float:
    """Clip the global gradient norm (0: do not clip) and return it (before clipping)."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def all_reduce_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def peak_memory_gib(d: Dist) -> float:
    """This process's peak memory: CUDA memory allocated on GPU, resident set size on CPU."""
    if d.device.type == "cuda":
        return torch.cuda.max_memory_allocated(d.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def progress(iterable, d: Dist, total: int, initial: int, desc: str):
    """A tqdm bar on rank 0 (TQDM_DISABLE=1 turns it off)."""
    from tqdm.auto import tqdm

    off = {} if d.is_main else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE
    return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True, **off)


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step, appended and flushed by rank 0.

    On resume the rows after the checkpoint's step (written by the interrupted run, about to be
    redone) are dropped first, so every step appears once.
    """

    def __init__(self, path: str | os.PathLike, d: Dist, resume_step: int = 0):
        self.file = None
        if not d.is_main:
            return
        path = Path(path)
        kept = []
        if resume_step and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
        self.file = open(path, "a", encoding="utf-8")

    def log(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


# Checkpoints: output_dir/checkpoint-STEP, written with torch.distributed.checkpoint (each process
# writes its shards; any number of processes can load them). Only tensors go through DCP, which
# loads them with torch.load(weights_only=True); the rest (step, optimizer hyperparameters, RNG
# states) is JSON. The learning rate is a pure function of the step (`lr_at`).

def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = sorted(p for p in Path(out_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit())
    return found[-1] if found else None


def _train_state(policy, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = get_optimizer_state_dict(policy, optimizer)
    return {"model": get_model_state_dict(policy), "optimizer": optim["state"]}, optim["param_groups"]


def _rng_state() -> dict:
    import base64

    def encode(t):
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    version, state, gauss = random.getstate()
    out = {"python": [version, list(state), gauss], "torch": encode(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = encode(torch.cuda.get_rng_state())
    return out


def _set_rng_state(state: dict) -> None:
    import base64

    def decode(text):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


@contextlib.contextmanager
def _one_process_dcp():
    """DCP warns when it runs without a process group; on one process that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(out_dir: str | os.PathLike, step: int, policy, optimizer, d: Dist,
                    info: dict | None = None) -> Path:
    """Write output_dir/checkpoint-STEP (model, optimizer, step, RNG states) and delete older ones.

    Atomic: every process writes into a temporary directory, then rank 0 renames it, so a
    checkpoint directory is either complete or absent; an interrupted save leaves the last one.
    """
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    final, tmp = out_dir / f"checkpoint-{step:08d}", out_dir / f".checkpoint-{step:08d}.tmp"
    if d.is_main:
        _rmtree(tmp)
    barrier(d)
    state, param_groups = _train_state(policy, optimizer)
    with _one_process_dcp():
        dcp.save(state, checkpoint_id=tmp)
    atomic_write_text(tmp / f"rng_rank{d.rank}.json", json.dumps(_rng_state()))
    barrier(d)
    if d.is_main:
        atomic_write_text(tmp / "trainer_state.json", json.dumps(
            {**(info or {}), "step": step, "world_size": d.world_size, "param_groups": param_groups}, indent=1))
        _rmtree(final)
        os.replace(tmp, final)
        for old in out_dir.glob("checkpoint-*"):
            if old != final:  # renamed first: a half-deleted checkpoint never shows under its name
                hidden = out_dir / f".{old.name}.tmp"
                os.replace(old, hidden)
                _rmtree(hidden)
    barrier(d)
    return final


def load_checkpoint(path: str | os.PathLike, policy, optimizer, d: Dist) -> dict:
    """Load a `save_checkpoint` directory into policy and optimizer (resharding as needed); return
    its trainer_state.json (with "step": the optimizer steps already done)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    info = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    state, _ = _train_state(policy, optimizer)
    with _one_process_dcp():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, {"state": state["optimizer"], "param_groups": info["param_groups"]})
    rng = path / f"rng_rank{d.rank}.json"
    if rng.exists():  # absent when resuming on more processes than saved: the data order needs no RNG
        _set_rng_state(json.loads(rng.read_text(encoding="utf-8")))
    return info


def unmap_large_blocks_when_freed(threshold: int = 4 << 20) -> None:
    """Have glibc give every allocation of `threshold` bytes or more its own mmap, returned to the
    OS when freed. By default glibc raises that threshold to the size of each large block freed
    (up to 32 MiB), so from the first step on a training step's activations and logits chunks come
    from its heap, whose free space the step's mix of sizes fragments: in bench/dpo_vs_trl.py's CPU
    run the heap grew to 0.95 GiB for 0.50 GiB of live tensors, 0.68 GiB with this. The price is
    zeroing fresh pages for those blocks (a lower threshold saves more memory and costs more time).
    For the whole process; an explicit MALLOC_MMAP_THRESHOLD_ wins; a no-op without glibc."""
    import ctypes

    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # musl has a mallopt that ignores it
        ctypes.CDLL(None).mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also stops the raising


def start_training(s: TrainSettings) -> tuple[Dist, Path | None] | None:
    """The common start of sft.py and dpo.py: (Dist, the checkpoint to resume from or None), or None
    when output_dir already holds the final model (a rerun is a no-op). A checkpoint found without
    --resume is an error rather than silently overwritten; leftovers of an interrupted save go."""
    from transformers.utils import logging

    out = Path(s.output_dir)
    if os.environ.get("RANK", "0") == "0":
        clean_interrupted_save(out)
    if final_model_exists(out):
        if os.environ.get("RANK", "0") == "0":
            print(f"{out} already holds the trained model; nothing to do (remove it to train again)")
        return None
    logging.disable_progress_bar()  # one bar, ours; not transformers' per-file ones
    d = setup_distributed()
    if d.device.type == "cpu":
        unmap_large_blocks_when_freed()
    check_train_settings(s, d)
    if d.is_main:
        for tmp in out.glob(".checkpoint-*.tmp"):
            _rmtree(tmp)
    ckpt = latest_checkpoint(out)
    if ckpt and not s.resume:
        raise UserError(f"{out}: holds {ckpt.name} of an earlier run; pass --resume to continue it, "
                        "or choose another --output_dir")
    torch.manual_seed(s.seed)
    return d, ckpt


def final_model_exists(out_dir: str | os.PathLike) -> bool:
    p = Path(out_dir)
    return (p / "config.json").is_file() and any((p / n).is_file() for n in ("model.safetensors",
                                                                            "model.safetensors.index.json"))


def stop_if_not_finite(script: str, step: int, values: dict[str, float], out_dir: str | os.PathLike) -> None:
    """Before optimizer step `step` (from 1): stop with a UserError if a value of it (the loss, the
    gradient norm; the same on every process) is NaN or infinite, since the update would write it
    into the weights. The last checkpoint stays as it is and the final model is not written."""
    name, value = next(((k, v) for k, v in values.items() if not math.isfinite(v)), (None, None))
    if name is None:
        return
    ckpt = latest_checkpoint(out_dir)
    last = (f"The last good checkpoint (step {int(ckpt.name[11:])}) is in {ckpt}; resume from it with --resume and "
            "a lower --lr, or check the data" if ckpt else
            "No checkpoint was written yet (see --save_every); lower --lr or check the data")
    raise UserError(f"{script}: step {step}: {name} is {value}; stopping. {last}")


def note_changed_settings(out_dir: str | os.PathLike, settings: dict, d: Dist) -> None:
    """On resume, print the settings that differ from the ones the run was started with."""
    path = Path(out_dir) / "settings.json"
    if not d.is_main or not path.exists():
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"{k}: {before[k]!r} -> {v!r}" for k, v in settings.items() if k in before and before[k] != v
               and k != "resume"]
    if changed:
        print(f"note: resuming with changed settings ({'; '.join(changed)})")


def save_final_model(policy: SequenceLogps, tokenizer, out_dir: str | os.PathLike, d: Dist,
                     keep=("settings.json", "metrics.jsonl", "data_stats.json", "summary.json")) -> None:
    """Gather the full state dict onto rank 0's CPU and write output_dir as a Hugging Face model
    directory (`save_hf_model`, atomic). The run's small files named in `keep` are carried into it;
    checkpoints, no longer needed, leave with the old directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {}  # tied weights (one parameter, several names) are saved once, as transformers does
    for name, param in policy.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name in (n for group in names.values() for n in group[1:]):
        state.pop(name, None)
    if d.is_main:
        out_dir = Path(out_dir)
        extra = {name: (out_dir / name).read_bytes() for name in keep if (out_dir / name).is_file()}
        save_hf_model(policy.model, tokenizer, out_dir, state_dict=state, extra_files=extra)
    barrier(d)


# ---------------------------------------------------------------------------------------------
# Generation and scoring: what sample.py, evaluate.py and label.py share. A response is sampled
# from its own seeded noise stream, so it depends on (seed, prompt index, sample index) and the
# model, not on which other prompts share its batch or process.

_MASK64, _GOLDEN = (1 << 64) - 1, 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int: a well-mixed 64-bit hash."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def response_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The noise stream of response `sample_index` to prompt `prompt_index` (as a signed int64)."""
    return _signed(_mix64(_mix64(_mix64(seed + _GOLDEN) + prompt_index) + sample_index))


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def stream_gumbel(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab] (float64): element (b, v) is a hash of (seeds[b], step, v), so
    row b's noise is the same whatever the batch around it, on any device.

    `_mix64`'s arithmetic on int64 tensors (multiplication wraps; right shifts made logical by a
    mask), done in place in one [B, vocab] buffer and one scratch: a third of the time of the
    out-of-place formula at a 152k vocabulary, the same bits (tests/test_sample.py)."""
    counter = (step << 24) + torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = seeds.unsqueeze(1) + (counter * _signed(_GOLDEN)).unsqueeze(0)
    shifted = torch.empty_like(x)

    def xor_shifted_right(k: int) -> None:  # x ^= x >>> k, a logical shift: the sign bits masked off
        torch.bitwise_right_shift(x, k, out=shifted)
        x.bitwise_xor_(shifted.bitwise_and_((1 << (64 - k)) - 1))

    xor_shifted_right(30)
    x *= _signed(_MIX1)
    xor_shifted_right(27)
    x *= _signed(_MIX2)
    xor_shifted_right(31)
    x >>= 11
    u = x.bitwise_and_((1 << 53) - 1).double().add_(0.5).div_(2.0**53)  # in (0, 1)
    return u.log_().neg_().log_().neg_()


class SeededSampler:
    """Picks each row's next token: argmax(logits / T + g) with g ~ Gumbel(0, 1) from the row's own
    stream (Gumbel-max: a draw from softmax(logits / T)); top-p removes the tail first; temperature 0
    is greedy. `sampler(logits [b, V], step, rows) -> token ids [b]`, where `rows` (a list of b
    indices into `seeds`) names the rows still in the batch.
    """

    def __init__(self, seeds: torch.Tensor, temperature: float, top_p: float = 1.0):
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p

    def __call__(self, logits: torch.Tensor, step: int, rows: list[int] | None = None) -> torch.Tensor:
        logits = logits.float()
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_p < 1.0:  # keep the smallest set of top tokens whose mass reaches top_p
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= self.top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        seeds = self.seeds if rows is None else self.seeds[rows]
        noise = stream_gumbel(seeds.to(logits.device), step, logits.shape[-1])
        return (logits.double() + noise).argmax(-1)


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on GPU, float32 on CPU; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, **DTYPES}[name]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and any end-of-turn ids in the model's generation config."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(ids)


def preallocated_kv_cache(config, capacity: int):
    """A DynamicCache whose full-attention layers write each step's keys and values in place into
    buffers of `capacity` positions and hand attention views of the filled part. DynamicLayer
    instead grows by `torch.cat`, copying the whole cache of every layer at every step (on CPU, with
    a fresh allocation each time, the largest single cost of sampling). Same values, same tokens.
    Sliding-window and other layer kinds stay as transformers makes them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)  # device (and dtype in some 5.x), flag
                self.key_buffer = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[3]))
                self.value_buffer = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[3]))
                self.keys = self.key_buffer[:, :, :0]
            start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:  # rows leave the batch
            if self.is_initialized:
                end = self.keys.shape[2]
                self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _forward_kwargs(model) -> dict:
    """What a decoder's forward is called with besides its inputs: the cache's keyword (`cache` from
    transformers 5.2x, `past_key_values` before) and, where it has one, logits for the last position only."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache_key": "cache" if "cache" in params else "past_key_values",
            "logits_to_keep": {"logits_to_keep": 1} if "logits_to_keep" in params else {}}


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampler, max_new_tokens: int,
           stops: list[int]) -> list[list[int]]:
    """Each row's new tokens, up to and including its first stop id, from a left-padded batch.

    The decode loop `generate` runs (one forward over the prompts, then one token per step on the
    cache, positions counted from each row's first real token), with one change: a row that emits a
    stop id leaves the batch, cache included, so the remaining steps cost only the rows still
    running. transformers' `generate` keeps every row to the end of the longest, feeding pad tokens.
    """
    kw = _forward_kwargs(model)
    rows, width = input_ids.shape
    device = input_ids.device
    cache = preallocated_kv_cache(model.config, width + max_new_tokens)
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, max_new_tokens)], 1)  # every step's columns
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    live, stop_set = list(range(rows)), set(stops)  # the input row of each row still in the batch
    tokens: list[list[int]] = [[] for _ in range(rows)]
    inputs = input_ids
    for step in range(max_new_tokens):
        logits = model(input_ids=inputs, attention_mask=mask[:, :width + step], position_ids=positions,
                       use_cache=True, **{kw["cache_key"]: cache}, **kw["logits_to_keep"]).logits[:, -1]
        chosen = sampler(logits, step, live)
        keep = []
        for k, (row, token) in enumerate(zip(live, chosen.tolist())):  # the step's one device sync
            tokens[row].append(token)
            if token not in stop_set:
                keep.append(k)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(live):
            live = [live[k] for k in keep]
            keep = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep)
            mask, chosen, positions = mask[keep], chosen[keep], positions[keep]
        inputs, positions = chosen.unsqueeze(1), positions[:, -1:] + 1
    return tokens


@torch.inference_mode()
def generate_responses(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32,
                       desc: str | None = None) -> list[dict]:
    """One response per prompt (repeat a prompt for several), in input order:
    {"text", "token_ids" (EOS included if emitted), "num_tokens", "finish_reason": "eos" | "length"}.

    Prompts are sorted by length (longest first: memory trouble shows at once) and left-padded into
    batches of `batch_size`, so a batch holds similar lengths; `decode` runs each batch, dropping
    rows as they finish. temperature 0 is greedy; otherwise row i samples from stream `seeds[i]`
    (`SeededSampler`). The model's own generation config (its temperature, penalties) is not used.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[dict | None] = [None] * len(prompt_ids)
    off = {} if desc else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE
    for batch in tqdm(batches, desc=desc, dynamic_ncols=True, **off):
        width = max(len(prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            mask[row, width - len(prompt_ids[i]):] = 1
        sampler = SeededSampler(torch.tensor([seeds[i] for i in batch]), temperature, top_p)
        generated = decode(model, ids.to(device), mask.to(device), sampler, max_new_tokens, stops)
        for row, i in enumerate(batch):
            tokens = generated[row]
            ended = tokens[-1] in stops
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
            out[i] = {"text": text, "token_ids": tokens, "num_tokens": len(tokens),
                      "finish_reason": "eos" if ended else "length"}
    return out


def load_function(spec: str, what: str):
    """The function named by "module:function" (importable from the working directory or this
    repository) or "path/to/file.py:function"."""
    import importlib
    import importlib.util

    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise UserError(f"{what} {spec!r}: expected module:function")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise UserError(f"{what} {spec!r}: {module_name} not found")
            loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            for path in (os.getcwd(), str(Path(__file__).resolve().parent)):
                if path not in sys.path:
                    sys.path.append(path)
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what} {spec!r}: cannot import {module_name} ({e})")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{what} {spec!r}: {module_name} has no function {name!r}")
    return fn


class RewardModel:
    """A reward model: `AutoModelForSequenceClassification` with one label, called as
    `rm(prompts, responses) -> list[float]`.

    It reads each (prompt, response) as its own tokenizer formats it (never the policy's ids): the
    conversation through its chat template, else `text_format` ("{prompt}" and "{response}"
    filled in; a backslash-n in it is a newline, so that flags and recipe files can carry one),
    else the tokenizer's pair encoding. Batches are sorted by length and right-padded with an id
    that occurs in none of the batch's sequences, set as the model's pad id for the call:
    transformers reads the score at the last token that is not the pad id, so it is read at the
    last real token even where the real pad id is EOS and ends a sequence. A sequence longer
    than `max_length` (0: no limit) loses tokens from the left.
    """

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, batch_size: int = 16,
                 max_length: int = 0, text_format: str = "", trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(name, trust_remote_code)
        self.model = load_model(name, dtype, trust_remote_code, AutoModelForSequenceClassification).to(device)
        if self.model.config.num_labels != 1:
            raise UserError(f"{name}: reward model has num_labels={self.model.config.num_labels}, expected 1")
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.text_format = text_format.replace("\\n", "\n")

    def encode(self, prompt, response: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) and not self.text_format:
            messages = prompt_messages(prompt) + [{"role": "assistant", "content": response}]
            ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        elif self.text_format:
            try:
                text = self.text_format.format(prompt=prompt_user_text(prompt), response=response)
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"text format {self.text_format!r}: only {{prompt}} and {{response}} may be in "
                                f"braces ({type(e).__name__}: {e})") from None
            ids = tok(text)["input_ids"]
        else:
            ids = tok(prompt_user_text(prompt), response)["input_ids"]
        return ids[-self.max_length:] if self.max_length else ids

    @torch.inference_mode()
    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        config = self.model.config.get_text_config()
        own_pad, vocab = config.pad_token_id, self.model.get_input_embeddings().num_embeddings
        scores = [0.0] * len(seqs)
        try:
            for start in range(0, len(order), self.batch_size):
                batch = [seqs[i] for i in order[start:start + self.batch_size]]
                used = {t for s in batch for t in s}
                config.pad_token_id = own_pad if own_pad is not None and own_pad not in used else next(
                    t for t in range(vocab) if t not in used)
                ids, mask, _ = pad_batch(batch, [[] for _ in batch], config.pad_token_id)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for i, value in zip(order[start:start + self.batch_size], logits[:, 0].float().tolist()):
                    scores[i] = value
        finally:
            config.pad_token_id = own_pad
        return scores


def load_scorer(reward_fn: str, reward_model: str, device: torch.device, dtype: torch.dtype, batch_size: int = 16,
                max_length: int = 0, text_format: str = "", trust_remote_code: bool = False, flag: str = "reward"):
    """`scorer(prompts, responses) -> list[float]` from exactly one of a function spec and a model.

    A function gets the user prompt text (`prompt_user_text`) and the response text; a reward model
    gets the whole prompt (chat messages included)."""
    if bool(reward_fn) == bool(reward_model):
        raise UserError(f"give exactly one of --{flag}_fn module:function and --{flag}_model DIR_OR_HUB_ID")
    if reward_model:
        return RewardModel(reward_model, device, dtype, batch_size, max_length, text_format, trust_remote_code)
    fn = load_function(reward_fn, f"--{flag}_fn")

    def score(prompts: list, responses: list[str]) -> list[float]:
        values = list(fn([prompt_user_text(p) for p in prompts], list(responses)))
        if len(values) != len(responses):
            raise UserError(f"--{flag}_fn {reward_fn}: returned {len(values)} scores for {len(responses)} responses")
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"--{flag}_fn {reward_fn}: returned a score that is not a number") from None

    return score
