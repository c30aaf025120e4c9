"""Models and tokenizers: a hub id or a local Hugging Face directory. Weights only from
safetensors; remote code only when asked for; a model directory is written atomically.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import tempfile
from pathlib import Path

import torch

from brevity.config import UserError
from brevity.files import rmtree


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


def final_model_exists(out_dir: str | os.PathLike) -> bool:
    p = Path(out_dir)
    return (p / "config.json").is_file() and any((p / n).is_file() for n in ("model.safetensors",
                                                                            "model.safetensors.index.json"))


def release_memory() -> None:
    """Return freed memory once the last reference to a model is gone (the caller drops it first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
