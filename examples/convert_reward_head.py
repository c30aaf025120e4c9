r"""Turn a reward model saved in a custom-code layout into one transformers' own classes load.

    huggingface-cli download Nexusflow/Starling-RM-34B --local-dir ckpt/starling-rm-34b
    python examples/convert_reward_head.py --checkpoint ckpt/starling-rm-34b --output_dir ckpt/starling-rm-34b-hf
    python label.py --samples ... --reward_model ckpt/starling-rm-34b-hf

A download without tokenizer files is refused before anything is written; take its base model's then:
    huggingface-cli download 01-ai/Yi-34B-Chat --include "tokenizer*" "special_tokens_map.json" \
        --local-dir ckpt/yi-34b-chat
and add `--tokenizer ckpt/yi-34b-chat` to the conversion.

Why: Starling-RM-34B's model card defines its own `LlamaForSequenceClassification` whose backbone is
`self.transformer` (a LlamaModel) and whose head is `self.v_head` (Linear(hidden, 1, bias=False)); the
reward is the head's output at the token before the first pad (PAD_ID 0). Its weights are therefore
named `transformer.*` and `v_head.weight`, while transformers' class of the same name expects
`model.*` and `score.weight`: `AutoModelForSequenceClassification` would load it with a randomly
initialised head and backbone, and only warn. This script renames the keys (--prefix_map) and writes
a config transformers reads as that class with one label and the card's pad id, so label.py and
evaluate.py (common.RewardModel) read the reward at the last real token as the card does.

The stage: check everything that is cheap first (config, every key and shape against the target class
built on the meta device, free disk space, the tokenizer) -> stream the weights one input shard at a
time into safetensors shards and model.safetensors.index.json (34B in bfloat16 is ~68 GB; memory peaks
at about twice the largest input shard, while safetensors serialises it) -> rename the temporary
directory to --output_dir, so the output is complete or absent. Reads model.safetensors[.index.json]
with safetensors, or pytorch_model.bin[.index.json] with torch.load(weights_only=True, mmap=True): no
pickled code runs. Rotary `inv_freq` buffers, which old checkpoints saved and transformers recomputes
from the config, are dropped. A rerun whose output is already complete says so and does nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py sits one level up
from common import UserError, clean_interrupted_save, load_tokenizer, run_main, save_settings, setting  # noqa: E402

TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them makes a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
INDEX = "model.safetensors.index.json"
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers, not weights: transformers recomputes them


@dataclasses.dataclass
class Settings:
    checkpoint: str = setting("", "the downloaded checkpoint directory (config.json and model.safetensors[.index.json] "
                                  "or pytorch_model.bin[.index.json])")
    output_dir: str = setting("", "where the converted model goes; created atomically, must not exist unless complete")
    prefix_map: str = setting("transformer.=model.,v_head.=score.",
                              "old=new key prefixes, comma-separated; every key must match one (the longest wins)")
    pad_token_id: int = setting(0, "the pad id written into the config (the card's PAD_ID); the reward is read at "
                                   "the last token that is not this id")
    tokenizer: str = setting("", "directory to copy the tokenizer files from; empty: --checkpoint (for a download "
                                 "without them, as Starling-RM-34B's may be: its base model 01-ai/Yi-34B-Chat)")


# ---------------------------------------------------------------------------------------------
# Pure helpers.

def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def parse_prefix_map(spec: str) -> list[tuple[str, str]]:
    """"a.=b.,c.=d." -> [("a.", "b."), ("c.", "d.")], longest old prefix first."""
    pairs = []
    for item in spec.split(","):
        old, sep, new = item.strip().partition("=")
        if not sep or not old:
            raise UserError(f"--prefix_map {spec!r}: each item must be old=new, old not empty; got {item!r}")
        pairs.append((old, new))
    return sorted(pairs, key=lambda p: -len(p[0]))


def rename(key: str, prefix_map: list[tuple[str, str]]) -> str | None:
    """The new name of `key`, or None when no old prefix matches."""
    for old, new in prefix_map:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def input_shards(ckpt: Path) -> tuple[Path, list[Path]]:
    """(the index or single weight file, the weight files in index order)."""
    for index_name, single in ((INDEX, "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (ckpt / index_name).exists():
            try:
                weight_map = json.loads((ckpt / index_name).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{ckpt / index_name}: not a weight index ({type(e).__name__}: {e})") from None
            files = list(dict.fromkeys(weight_map.values()))
            for name in files:
                if not (ckpt / name).is_file():
                    raise UserError(f"{ckpt / index_name}: lists {name}, which is not in {ckpt} (incomplete download?)")
            return ckpt / index_name, [ckpt / name for name in files]
        if (ckpt / single).is_file():
            return ckpt / single, [ckpt / single]
    raise UserError(f"{ckpt}: no {INDEX}, model.safetensors, pytorch_model.bin.index.json or pytorch_model.bin")


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one input shard; a .bin is memory-mapped and read as weights only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file: many exception types, one message
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {first_line(e)})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def shard_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape without reading the data (safetensors header; a .bin is memory-mapped)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {first_line(e)})")
    return {k: tuple(v.shape) for k, v in load_shard(path).items()}


def target_config(ckpt: Path, pad_token_id: int):
    """The checkpoint's config as transformers' sequence classifier of its model type, one label."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(ckpt)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{ckpt / 'config.json'}: cannot read ({first_line(e)})") from None
    cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if cls is None:
        raise UserError(f"{ckpt / 'config.json'}: transformers has no sequence classifier for model_type "
                        f"{config.model_type!r}")
    config.architectures = [cls]
    config.num_labels = 1  # also resets id2label/label2id
    config.pad_token_id = pad_token_id
    if hasattr(config, "auto_map"):  # the point is to need no remote code
        del config.auto_map
    return config


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the target class's state dict, built on the meta device (no memory, no init)."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def old_name(new_key: str, prefix_map: list[tuple[str, str]]) -> str:
    """What `new_key` is called in the checkpoint's layout (for messages)."""
    for old, new in sorted(prefix_map, key=lambda p: -len(p[1])):
        if new_key.startswith(new):
            return old + new_key[len(new):]
    return new_key


def plan_renames(weights: Path, shards: list[Path], prefix_map, expected: dict[str, tuple[int, ...]],
                 target: str) -> list[tuple[Path, list[tuple[str, str]]]]:
    """[(input shard, [(old key, new key)])] for the shards that keep a tensor, after every check that
    needs no tensor data: unknown keys, duplicates, wrong shapes, missing keys (the head above all).
    `weights` is the index (or single weight file), named when a key is missing."""
    plan, seen = [], {}
    for path in shards:
        renames = []
        for key, shape in shard_shapes(path).items():
            if key.endswith(DROPPED_SUFFIXES):
                continue
            new = rename(key, prefix_map)
            if new is None:
                raise UserError(f"{path}: key {key!r} matches no --prefix_map prefix "
                                f"({','.join(f'{o}={n}' for o, n in prefix_map)})")
            if new not in expected:
                raise UserError(f"{path}: key {key!r} becomes {new!r}, which {target} has no weight of")
            if new in seen:
                raise UserError(f"{path}: key {key!r} becomes {new!r}, which {seen[new]} already gives")
            if shape != expected[new]:
                raise UserError(f"{path}: key {key!r} has shape {list(shape)}, {target} needs {list(expected[new])}")
            seen[new] = f"{path.name}:{key}"
            renames.append((key, new))
        if renames:
            plan.append((path, renames))
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{weights}: no key {old_name(missing[0], prefix_map)!r}, which {target} needs as "
                        f"{missing[0]!r}{more}")
    return plan


def copy_tokenizer(src: Path, dst: Path):
    """Copy `src`'s tokenizer files into `dst`; (the names copied, the tokenizer loaded from `dst`)."""
    if not any((src / n).is_file() for n in TOKENIZER_VOCABS):
        raise UserError(f"{src}: no tokenizer ({' or '.join(TOKENIZER_VOCABS)}); pass --tokenizer DIR "
                        "(for Starling-RM-34B: a download of its base model 01-ai/Yi-34B-Chat)")
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for n in names:
        shutil.copyfile(src / n, dst / n)
    try:
        return names, load_tokenizer(str(dst))
    except UserError as e:
        raise UserError(str(e).replace(str(dst), str(src), 1)) from None
    except Exception as e:  # a damaged file: transformers raises many types
        raise UserError(f"{src}: cannot load tokenizer ({type(e).__name__}: {first_line(e)})") from None


def is_complete(out: Path) -> bool:
    """An output this script finished: config, settings, index, and every shard the index names."""
    try:
        weight_map = json.loads((out / INDEX).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False
    return ((out / "config.json").is_file() and (out / "settings.json").is_file()
            and all((out / name).is_file() for name in set(weight_map.values())))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    seen_storages = set()
    for k, t in tensors.items():  # safetensors refuses shared or strided storage; a .bin may have either
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storages or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            tensors[k] = t.contiguous().clone()
        seen_storages.add(ptr)
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_file(path)


# ---------------------------------------------------------------------------------------------

def main(s: Settings) -> Path:
    if not s.checkpoint or not s.output_dir:
        raise UserError("give --checkpoint DIR (the download) and --output_dir DIR (the converted model)")
    ckpt, out = Path(s.checkpoint), Path(s.output_dir)
    if not (ckpt / "config.json").is_file():
        raise UserError(f"{ckpt}: no config.json, not a downloaded checkpoint directory")
    clean_interrupted_save(out)  # a killed earlier run leaves only its hidden temporary directory
    if out.exists():
        if is_complete(out):
            print(f"{out}: already converted (complete); nothing to do")
            return out
        raise UserError(f"{out}: exists but is not a complete conversion; remove it or choose another --output_dir")

    # Everything cheap first, so a mistake is found in seconds, not after writing 68 GB.
    prefix_map = parse_prefix_map(s.prefix_map)
    config = target_config(ckpt, s.pad_token_id)
    weights, shards = input_shards(ckpt)
    plan = plan_renames(weights, shards, prefix_map, expected_shapes(config), config.architectures[0])
    need = sum(p.stat().st_size for p, _ in plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise UserError(f"{out.parent}: {free / 1e9:.1f} GB free, the converted weights need {need / 1e9:.1f} GB")

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary shared directory
    try:
        copied, tok = copy_tokenizer(Path(s.tokenizer) if s.tokenizer else ckpt, tmp)
        if len(tok) > config.vocab_size:
            raise UserError(f"{s.tokenizer or ckpt}: tokenizer has {len(tok)} tokens, the model's vocabulary "
                            f"{config.vocab_size}; is it the checkpoint's tokenizer?")
        config.save_pretrained(tmp)
        weight_map, total_bytes = {}, 0
        for i, (path, renames) in enumerate(plan, start=1):
            name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            state = load_shard(path)
            tensors = {new: state[old] for old, new in renames}
            del state
            write_shard(tensors, tmp / name)
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            total_bytes += size
            weight_map.update({new: name for _, new in renames})
            print(f"[{i}/{len(plan)}] {path.name} -> {name}: {len(renames)} tensors, {size / 1e9:.2f} GB", flush=True)
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        save_settings(tmp, s)
        for f in tmp.iterdir():
            fsync_file(f)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}: {config.architectures[0]}, num_labels 1, pad_token_id {s.pad_token_id}, "
          f"{len(weight_map)} tensors in {len(plan)} shards, tokenizer files {', '.join(copied)}")
    return out


if __name__ == "__main__":
    run_main(main, (Settings,))
