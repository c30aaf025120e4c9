"""Models and tokenizers: a hub id or a local Hugging Face directory. Weights only from
safetensors; remote code only when asked for; a model directory is written atomically.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import tempfile
from pathlib import Path

import torch

from brevity.config import UserError
from brevity.files import respect_umask, rmtree


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPUTE_DTYPE_HELP = ("dtype of the matrix multiplies; auto: bfloat16 on GPU and on CPUs with bfloat16 instructions "
                      "(AVX512-BF16, AMX), else float32. Log-softmax, log-probs and losses are float32 either way")


@functools.cache
def cpu_bfloat16_support() -> str:
    """Why this CPU computes bfloat16 natively ("avx512_bf16", "amx_bf16"), or "" when it does not
    (there, bfloat16 matrix multiplies are emulated and slower than float32 ones)."""
    cpu = getattr(torch, "cpu", None)
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx_bf16"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    try:  # torch without those probes: the kernel's flags
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ""
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), "")


@functools.cache
def compute_dtype(name: str, device_type: str) -> torch.dtype:
    """The dtype matrix multiplies run in on `device_type` ("cpu", "cuda"). "auto": bfloat16 on GPU
    and on CPUs with bfloat16 instructions, else float32 (saying why, once per process)."""
    if name != "auto":
        return DTYPES[name]
    if device_type == "cuda" or cpu_bfloat16_support():
        return torch.bfloat16
    if os.environ.get("RANK", "0") == "0":
        print("compute in float32: this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16), so bfloat16 "
              "would be slower here; --compute_dtype bfloat16 forces it")
    return torch.float32


def inference_dtype(name: str, device: torch.device, compute: str = "auto") -> torch.dtype:
    """The dtype a model is loaded in to sample or score: "auto" is the compute dtype (`compute_dtype`),
    so the weights are already what the matrix multiplies take; else the named dtype."""
    if name == "auto":
        return compute_dtype(compute, device.type)
    return {"float16": torch.float16, **DTYPES}[name]


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a safetensors file (cut short, a damaged header), or None; from its header
    alone, so it is cheap for any size: the header declares where each tensor ends."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size, header_length = path.stat().st_size, int.from_bytes(f.read(8), "little")
            if size < 8 or header_length > size - 8:
                return f"{path.name}: cut short ({size} bytes; not a whole safetensors file)"
            header = json.loads(f.read(header_length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return f"{path.name}: not found"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{path.name}: damaged header (not a safetensors file)"
    if 8 + header_length + end != size:
        return f"{path.name}: {size} bytes, but its header needs {8 + header_length + end} (cut short or damaged)"
    return None


def autocast_dtype(weights: torch.dtype, compute: torch.dtype) -> torch.dtype | None:
    """What autocast should compute in: `compute` for float32 weights that compute in a lower
    precision (mixed precision: the float32 weights are the master copy), else None (the weights'
    own dtype is the compute dtype; lower-precision weights compute in theirs)."""
    return compute if weights == torch.float32 and compute != torch.float32 else None


def autocast(device: torch.device, weights: torch.dtype, compute: torch.dtype):
    """torch.autocast to `autocast_dtype(weights, compute)`, or nothing. Autocast runs the matrix
    multiplies and attention in that dtype and leaves the rest in float32 (norms, residual sums, and
    softmaxes of float32 inputs: on CPU, a log-softmax of bfloat16 logits stays in bfloat16)."""
    dtype = autocast_dtype(weights, compute)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def check_model_dir(path: str) -> None:
    """A local model directory must hold a config and whole safetensors weights (every shard its
    index names, none cut short)."""
    p = Path(path)
    if not p.exists():
        return  # a hub id; transformers resolves it (offline here, so it will fail loudly)
    if not p.is_dir():
        raise UserError(f"{path}: expected a model directory, found a file")
    if not (p / "config.json").exists():
        raise UserError(f"{path}: no config.json, not a Hugging Face model directory")
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{path}: no *.safetensors weights (only safetensors are loaded)")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: damaged (no weight_map)")
        if missing := sorted(shards - {w.name for w in weights}):
            raise UserError(f"{path}: {index.name} names {missing[0]}, which is missing")
    for w in weights:
        if problem := safetensors_problem(w):
            raise UserError(f"{path}: {problem}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError: no files; ValueError: bad JSON; KeyError etc.: a damaged tokenizer.json
        first = (str(e).strip().splitlines() or [''])[0]
        raise UserError(f"{name_or_path}: cannot load tokenizer ({type(e).__name__}: {first})")
    if tok.eos_token_id is None:
        raise UserError(f"{name_or_path}: tokenizer has no eos_token; responses could never end")
    # tokens added to a tokenizer without resizing the embedding: their ids would index past it (an
    # IndexError mid-run on CPU, a device-side assert on GPU)
    if (rows := config_vocab_size(name_or_path, trust_remote_code)) and len(tok) > rows:
        raise UserError(f"{name_or_path}: its tokenizer has {len(tok)} tokens but config.json's vocab_size is {rows}; "
                        "resize the model's embedding (resize_token_embeddings) and save it again")
    return tok


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               model_class=None):
    """Load a causal LM (or `model_class`) from safetensors only, in eval mode (dropout off)."""
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError
    from transformers.utils import logging

    check_model_dir(name_or_path)
    cls = model_class or AutoModelForCausalLM
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its load report lists what is refused below, in many lines
    try:
        model, info = cls.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True,
                                          trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError, SafetensorError) as e:  # ValueError: e.g. custom code, refused without the flag
        hint = ("; it needs its own code, run only with --trust_remote_code (for models you trust)"
                if "trust_remote_code" in str(e) and not trust_remote_code else "")
        raise UserError(f"{name_or_path}: cannot load model ({(str(e).strip().splitlines() or [''])[0]}){hint}")
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise UserError(f"{name_or_path}: weights of other shapes than its config.json describes") from None
    finally:
        logging.set_verbosity(verbosity)
    # transformers fills a weight the file lacks with random values and drops one the model lacks, with a
    # warning: a config of another architecture or layer count would train or score a random model
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected:
        raise UserError(f"{name_or_path}: the weights do not fit the {type(model).__name__} its config.json describes "
                        f"({len(missing)} missing{', e.g. ' + missing[0] if missing else ''}; {len(unexpected)} "
                        f"unexpected{', e.g. ' + unexpected[0] if unexpected else ''})")
    return model.eval()


def check_same_vocabulary(tokenizer, name: str, other: str, flag: str, trust_remote_code: bool = False) -> None:
    """Model `other` (given by `flag`) reads the ids of `tokenizer` (model `name`'s): it must have
    the same vocabulary, or its log-probs are of other tokens, or of ids past its embedding."""
    if load_tokenizer(other, trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{flag} {other}: another vocabulary than {name}; it must read the same token ids")


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
        for name, content in (extra_files or {}).items():  # text, or bytes copied as they are
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
        respect_umask(tmp)  # mkdtemp and safetensors make theirs private; the result is an ordinary directory
        if out_dir.exists():  # replace an older copy: move it aside first, so one is always whole
            old = out_dir.with_name(f".{out_dir.name}.old")
            rmtree(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        rmtree(tmp)
        raise


def clean_interrupted_save(out_dir: str | os.PathLike) -> None:
    """Undo what a kill inside `save_hf_model` left: its temporary copy goes, and if the kill fell
    between its two renames (out_dir moved aside, the new copy not yet in place), the old copy
    comes back, so out_dir is as it was before the save."""
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.is_dir() and not out_dir.exists():
        os.replace(old, out_dir)
    rmtree(old)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        rmtree(tmp)


def model_fingerprint(path: str) -> str:
    """config.json and the name, size and mtime of each weights file; a hub id stands for itself.
    What a cache or a resume point made with a model compares, to know the model is the same."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = [(p / "config.json").read_text(encoding="utf-8") if (p / "config.json").exists() else ""]
    for f in sorted(p.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def final_model_exists(out_dir: str | os.PathLike) -> bool:
    p = Path(out_dir)
    return (p / "config.json").is_file() and any((p / n).is_file() for n in ("model.safetensors",
                                                                            "model.safetensors.index.json"))


def text_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config (its text model's, for a multimodal one)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).get_text_config()


def model_vocab_size(name_or_path: str, trust_remote_code: bool = False) -> int:
    """How many token ids the model reads: its config's vocab_size, often more than the tokenizer's
    tokens (embedding rows padded to a multiple of 8 or 64), all of which a sampler can emit."""
    return text_config(name_or_path, trust_remote_code).vocab_size


def sliding_window_below(config, max_length: int) -> int | None:
    """The config's attention window if some of its layers attend over fewer than `max_length` tokens
    (Mistral's, Gemma's sliding windows), else None: a custom [B, 1, T, T] mask replaces the mask the
    model would build itself, window included."""
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and 0 < window < max_length else None


def config_vocab_size(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """`model_vocab_size`, or None where there is no readable config (load_model says why, later)."""
    try:
        return model_vocab_size(name_or_path, trust_remote_code)
    except (OSError, ValueError, AttributeError):
        return None


def release_memory() -> None:
    """Return freed memory once the last reference to a model is gone (the caller drops it first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
