r"""Turn a reward model saved in a custom-code layout into one transformers' own classes load.

    huggingface-cli download Nexusflow/Starling-RM-34B --local-dir ckpt/starling-rm-34b
    python examples/convert_reward_head.py --checkpoint ckpt/starling-rm-34b --output_dir ckpt/starling-rm-34b-hf
    huggingface-cli download OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5 --local-dir ckpt/oasst-rm-2.1-pythia-1.4b
    python examples/convert_reward_head.py --checkpoint ckpt/oasst-rm-2.1-pythia-1.4b \
        --output_dir ckpt/oasst-rm-2.1-pythia-1.4b-hf
    python label.py --samples ... --reward_model ckpt/starling-rm-34b-hf

The source config's model_type picks the layout (LAYOUTS); one transformers knows is read as a model card's:

- Starling-RM-34B (model_type llama): its card defines its own `LlamaForSequenceClassification` whose
  backbone is `self.transformer` (a LlamaModel) and whose head is `self.v_head` (Linear(hidden, 1,
  bias=False)); the reward is the head's output at the token before the first pad (PAD_ID 0). Its keys
  are `transformer.*` and `v_head.weight`, while transformers' class of the same name expects `model.*`
  and `score.weight`: `AutoModelForSequenceClassification` would load it with a randomly initialised head
  and backbone, and only warn. A download without tokenizer files is refused before anything is written;
  take its base model's then (`huggingface-cli download 01-ai/Yi-34B-Chat --include "tokenizer*"
  "special_tokens_map.json" --local-dir ckpt/yi-34b-chat`, and `--tokenizer ckpt/yi-34b-chat`).
- OpenAssistant's oasst-rm-* (model_type gpt_neox_reward_model, class GPTNeoXRewardModel in
  Open-Assistant's model/model_training/models/reward_model.py, which transformers does not have): a
  GPTNeoXModel `gpt_neox` and `out_proj` = Linear(hidden, 1) WITH a bias, read at the last token the
  attention mask keeps (config pooling "last"; "mean" averages all tokens, which no transformers class
  does, and is refused). It becomes `GPTNeoXForSequenceClassification`, whose `score` has no bias: the
  bias b is folded into the final LayerNorm's, β' = β + b·w/(w·w), so that w·LN'(x) = w·LN(x) + b
  exactly. That holds because `score` reads the final LayerNorm's output directly and nothing else
  in that class reads it. The causal-mask buffers (attention.bias, attention.masked_bias) that
  transformers 4.28 saved are dropped. Its texts end with <|endoftext|>, Pythia's EOS, so the pad id
  written is the tokenizer's pad token (<|padding|>), never the EOS.

Either way the keys are renamed (--prefix_map) into a config transformers reads as that class with one
label and a pad id, so label.py and evaluate.py (brevity.scoring.RewardModel) read the reward where the original
code does: at the last real token.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the brevity package sits one level up
from brevity.config import UserError, run_main, setting  # noqa: E402
from brevity.files import respect_umask, save_settings  # noqa: E402
from brevity.models import clean_interrupted_save, load_tokenizer  # noqa: E402

TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them makes a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one custom-code reward model's checkpoint maps onto a transformers sequence classifier."""
    target_model_type: str  # "": the checkpoint's own model_type, which transformers knows
    prefix_map: str  # old=new key prefixes (--prefix_map's default)
    dropped: tuple[str, ...]  # key suffixes of buffers, not weights, when the target has no such key
    pad_token_id: int | None  # None: the tokenizer's pad token (--pad_token_id's default)
    head_bias: str = ""  # the head's bias key, folded into `norm_bias` (the target's head has no bias)
    head_weight: str = ""
    norm_bias: str = ""  # the target's key of the LayerNorm bias whose output the head reads directly


# A model card's own class around a backbone transformers knows (Starling-RM-34B: a LlamaModel).
CARD = Layout("", "transformer.=model.,v_head.=score.", ("rotary_emb.inv_freq",), pad_token_id=0)
LAYOUTS = {  # by the source config's model_type
    "gpt_neox_reward_model": Layout("gpt_neox", "gpt_neox.=gpt_neox.,out_proj.=score.",
                                    ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias"),
                                    pad_token_id=None, head_bias="out_proj.bias", head_weight="out_proj.weight",
                                    norm_bias="gpt_neox.final_layer_norm.bias"),
}


@dataclasses.dataclass
class Settings:
    checkpoint: str = setting("", "the downloaded checkpoint directory (config.json and model.safetensors[.index.json] "
                                  "or pytorch_model.bin[.index.json])")
    output_dir: str = setting("", "where the converted model goes; created atomically, must not exist unless complete")
    prefix_map: str = setting("", "old=new key prefixes, comma-separated; every key must match one (the longest "
                                  "wins); empty: the layout's (Starling-RM-34B's transformer.=model.,v_head.=score.; "
                                  "gpt_neox_reward_model's gpt_neox.=gpt_neox.,out_proj.=score.)")
    pad_token_id: int = setting(-1, "the pad id written into the config; the reward is read at the last token that "
                                    "is not this id; -1: the layout's (Starling-RM-34B's card PAD_ID 0; for "
                                    "gpt_neox_reward_model the tokenizer's pad token, which must not be its EOS)")
    tokenizer: str = setting("", "directory to copy the tokenizer files from; empty: --checkpoint (for a download "
                                 "without them, as Starling-RM-34B's may be: its base model 01-ai/Yi-34B-Chat)")


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


def load_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of an input shard (a safetensors file reads only it; a .bin is memory-mapped)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise UserError(f"{path}: cannot read {key!r} ({type(e).__name__}: {first_line(e)})")
    return load_shard(path)[key]


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


def read_config(ckpt: Path) -> dict:
    try:
        raw = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt / 'config.json'}: cannot read ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{ckpt / 'config.json'}: not a JSON object")
    return raw


def target_config(ckpt: Path, raw: dict, layout: Layout):
    """The checkpoint's config as transformers' sequence classifier of the layout's model type, one label
    (pad id still to set)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    where = ckpt / "config.json"
    try:
        if layout.target_model_type:
            pooling = raw.get("pooling") or "last"  # the source class's default
            if pooling != "last":
                raise UserError(f"{where}: pooling {pooling!r}; only 'last' (the score at the last attended token) "
                                f"converts: transformers' classifiers read one token, never a mean")
            own = {"model_type", "architectures", "auto_map", "pooling", "_name_or_path"}
            config = CONFIG_MAPPING[layout.target_model_type].from_dict({k: v for k, v in raw.items()
                                                                         if k not in own})
        else:
            config = AutoConfig.from_pretrained(ckpt)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: cannot read ({first_line(e)})") from None
    cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if cls is None:
        raise UserError(f"{where}: transformers has no sequence classifier for model_type {config.model_type!r}")
    config.architectures = [cls]
    config.num_labels = 1  # also resets id2label/label2id
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


def plan_renames(weights: Path, shards: list[Path], prefix_map, expected: dict[str, tuple[int, ...]], target: str,
                 layout: Layout = CARD) -> tuple[list[tuple[Path, list[tuple[str, str]]]], dict[str, Path]]:
    """([(input shard, [(old key, new key)])] for the shards that keep a tensor, {head key: its shard} for
    the layout's head weight and bias when it folds one), after every check that needs no tensor data:
    unknown keys, duplicates, wrong shapes, missing keys (the head above all). `weights` is the index (or
    single weight file), named when a key is missing."""
    plan, seen, head = [], {}, {}
    for path in shards:
        renames = []
        for key, shape in shard_shapes(path).items():
            if key in (layout.head_weight, layout.head_bias):
                head[key] = path
            if key == layout.head_bias:
                if shape != (1,):
                    raise UserError(f"{path}: key {key!r} has shape {list(shape)}, a one-score head's bias is [1]")
                continue  # folded, not copied
            new = rename(key, prefix_map)
            if key.endswith(layout.dropped) and new not in expected:
                continue
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
    if layout.head_bias and layout.head_bias not in head:
        raise UserError(f"{weights}: no key {layout.head_bias!r}, the head's bias (folded into {layout.norm_bias!r})")
    return plan, head


def fold_head_bias(norm_bias: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor) -> torch.Tensor:
    """The LayerNorm bias β' = β + b·w/(w·w) that adds the head's bias b to its score without a bias:
    w·(γ⊙n(x) + β') = w·(γ⊙n(x) + β) + b, exactly, since w·(b·w/(w·w)) = b. Valid only where the head
    reads that LayerNorm's output directly and nothing else reads it. Computed in float64, returned in
    β's dtype. β: [hidden], w: [1, hidden], b: [1] -> [hidden]."""
    w = head_weight.double().reshape(-1)
    shift = head_bias.double().reshape(()) * w / w.dot(w)
    return (norm_bias.double() + shift).to(norm_bias.dtype)


def resolve_pad_id(pad_token_id: int, layout: Layout, tok, where: str) -> int:
    """--pad_token_id, else the layout's, else the tokenizer's pad token, refused where it is its EOS:
    texts that end with EOS (OASST's end with <|endoftext|>) would be read one token early."""
    if pad_token_id >= 0:
        return pad_token_id
    if layout.pad_token_id is not None:
        return layout.pad_token_id
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise UserError(f"{where}: the tokenizer's pad token is {tok.pad_token!r}, the EOS or none; pass "
                        f"--pad_token_id with an id no text ends with (Pythia's <|padding|> is 1)")
    return tok.pad_token_id


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
    raw = read_config(ckpt)
    layout = LAYOUTS.get(raw.get("model_type"), CARD)
    prefix_spec = s.prefix_map or layout.prefix_map
    prefix_map = parse_prefix_map(prefix_spec)
    config = target_config(ckpt, raw, layout)
    weights, shards = input_shards(ckpt)
    plan, head = plan_renames(weights, shards, prefix_map, expected_shapes(config), config.architectures[0], layout)
    folded_norm_bias = None
    if layout.head_bias:
        norm_path, norm_key = next((p, old) for p, renames in plan for old, new in renames if new == layout.norm_bias)
        w = load_tensor(head[layout.head_weight], layout.head_weight)
        if not torch.isfinite(w).all() or float(w.double().square().sum()) == 0:
            raise UserError(f"{head[layout.head_weight]}: {layout.head_weight!r} is zero or not finite; its bias "
                            f"cannot be folded into {norm_key!r}")
        folded_norm_bias = fold_head_bias(load_tensor(norm_path, norm_key), w,
                                          load_tensor(head[layout.head_bias], layout.head_bias))
    need = sum(p.stat().st_size for p, _ in plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise UserError(f"{out.parent}: {free / 1e9:.1f} GB free, the converted weights need {need / 1e9:.1f} GB")

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        copied, tok = copy_tokenizer(Path(s.tokenizer) if s.tokenizer else ckpt, tmp)
        if len(tok) > config.vocab_size:
            raise UserError(f"{s.tokenizer or ckpt}: tokenizer has {len(tok)} tokens, the model's vocabulary "
                            f"{config.vocab_size}; is it the checkpoint's tokenizer?")
        config.pad_token_id = resolve_pad_id(s.pad_token_id, layout, tok, s.tokenizer or str(ckpt))
        config.save_pretrained(tmp)
        weight_map, total_bytes = {}, 0
        for i, (path, renames) in enumerate(plan, start=1):
            name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            state = load_shard(path)
            tensors = {new: state[old] for old, new in renames}
            del state
            if layout.norm_bias in tensors:
                tensors[layout.norm_bias] = folded_norm_bias
            write_shard(tensors, tmp / name)
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            total_bytes += size
            weight_map.update({new: name for _, new in renames})
            print(f"[{i}/{len(plan)}] {path.name} -> {name}: {len(renames)} tensors, {size / 1e9:.2f} GB", flush=True)
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        save_settings(tmp, dataclasses.replace(s, prefix_map=prefix_spec, pad_token_id=config.pad_token_id))
        for f in tmp.iterdir():
            fsync_file(f)
        respect_umask(tmp)  # mkdtemp and safetensors make theirs private; the result is an ordinary directory
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    folded = f", {layout.head_bias} folded into {layout.norm_bias}" if layout.head_bias else ""
    print(f"wrote {out}: {config.architectures[0]}, num_labels 1, pad_token_id {config.pad_token_id}{folded}, "
          f"{len(weight_map)} tensors in {len(plan)} shards, tokenizer files {', '.join(copied)}")
    return out


if __name__ == "__main__":
    run_main(main, (Settings,))
