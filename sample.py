"""Sample n responses per prompt from a policy: the first stage of an iteration.

    python sample.py --model runs/sft --prompts data/embedded/prompts.jsonl --output runs/dpo/iter1/samples.jsonl
    torchrun --nproc_per_node 8 sample.py --model ... --n 4 --temperature 0.7    # prompts split over processes

The stage: read prompts -> tokenize (the chat template with its generation prompt) -> decode with
the transformers model in batches of similar prompt lengths, left-padded, a row leaving its batch
when it emits EOS (brevity.generation.decode; every process holds a full copy of the model, never FSDP) ->
write samples.jsonl, one row per prompt in input order:

    {"prompt": <as given>, <the row's other fields>, "vocab_sha256": ...,
     "responses": [{"text", "token_ids", "num_tokens", "finish_reason"}, ...]}

`token_ids` are the sampled tokens, the stop token included when one was emitted (the chat template's
end of turn, the EOS or a generation-config eos id: brevity.generation.stop_token_ids), and `num_tokens`
their count; `finish_reason` is "eos", or "length" when max_new_tokens ran out first. `text` is those
tokens decoded as they are, less the stop token: a special token sampled inside a response (such as
<|im_start|> where the turn should have ended) stays in it, and is counted in the summary line.
`vocab_sha256` fingerprints the tokenizer's vocabulary, so that dpo.py trains on these very ids when its
tokenizer has the same one (label.py carries them into the pairs). vLLM rows carry no ids.

Determinism: response j to prompt i is sampled from its own noise stream, a hash of (seed, i, j)
(brevity.generation.SeededSampler), so it does not depend on the batch it was in, on --batch_size, on the
number of processes, or on an interruption and resume; the same run twice gives the same file. The
one caveat is floating point: a different batch shape (a prompt's left padding, in attention) can
change logits in the last bits, which can flip a token only where two choices tie to that
precision; in bfloat16 (--compute_dtype) those bits are coarser, so such a tie is likelier, though
still rare (BENCHMARKS.md has a count).

Progress is saved every --save_every prompts per process in OUTPUT.parts/; a rerun after an
interruption samples only the prompts not yet done (with any number of processes) and a rerun
after success does nothing. --engine vllm samples with vLLM instead (one process, its own seeds).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import typing
from pathlib import Path

from brevity.config import UserError, run_main, setting
from brevity.dist import all_gather_objects, barrier, cleanup_distributed, setup_distributed
from brevity.files import (PROMPT, atomic_write_text, check_output_path, load_rows, read_json, read_jsonl,
                           rows_fingerprint, save_settings, write_jsonl)
from brevity.generation import (GenerationSettings, check_generation_settings, generate_responses, response_seed,
                                sampling_key)
from brevity.models import check_model_dir, inference_dtype, load_model, load_tokenizer, model_fingerprint
from brevity.tokens import encode_prompts, end_of_turn_ids, special_ids, vocab_sha256

RESPONSE_FIELDS = ("text", "token_ids", "num_tokens", "finish_reason")


@dataclasses.dataclass
class Settings(GenerationSettings):
    model: str = setting("runs/sft", "policy: a local Hugging Face directory or a hub id")
    prompts: str = setting("data/embedded/prompts.jsonl", "rows with `prompt` (a string or chat messages): JSONL, a "
                                                          "saved dataset or a hub id; other fields are carried along")
    output: str = setting("runs/samples.jsonl", "samples JSONL to write (atomically); skipped if already complete")
    n: int = dataclasses.field(default=4, metadata={  # torchrun takes `--n` for an abbreviation of its own flags
        "help": "responses per prompt (under torchrun, spell it --num_responses)", "aliases": ["--num_responses"]})
    max_prompt_length: int = setting(0, "a longer prompt loses tokens from the left; 0: no limit")
    save_every: int = setting(256, "prompts per progress file in OUTPUT.parts/ (resume point); 0: only at the end")
    engine: typing.Literal["hf", "vllm"] = setting(
        "hf", "hf: the transformers model, decoded by brevity.generation.decode; vllm: vLLM, if installed")
    trust_remote_code: bool = setting(False, "run model/tokenizer code from the hub (only for models you trust)")


def check_settings(s: Settings) -> None:
    check_generation_settings(s)
    if s.n < 1 or s.save_every < 0 or s.max_prompt_length < 0:
        raise UserError("--n must be >= 1; --save_every and --max_prompt_length >= 0")


def run_key(s: Settings, prompts: list) -> str:
    """What a saved part must have been made with to be reused: the same prompts (their contents, not
    the file's name), the same model files, the same sampling settings (not batch size or engine layout)."""
    model = hashlib.sha256(model_fingerprint(s.model).encode("utf-8")).hexdigest()
    return json.dumps({"model": s.model, "model_files": model, "prompts": rows_fingerprint(prompts),
                       **{k: getattr(s, k) for k in ("n", "max_prompt_length", "engine")}, **sampling_key(s)},
                      sort_keys=True)


def parts_dir(output: str) -> Path:
    return Path(output).with_name(Path(output).name + ".parts")


def read_parts(folder: Path, key: str) -> dict[int, list[dict]]:
    """{prompt index: responses} from the progress files of an interrupted run with the same settings."""
    if not folder.is_dir():
        return {}
    saved_key = folder / "run_key.json"
    if saved_key.is_file() and saved_key.read_text(encoding="utf-8") != key:
        saved, now = read_json(saved_key), json.loads(key)
        changed = [k for k in now if not isinstance(saved, dict) or saved.get(k) != now[k]]
        raise UserError(f"{folder}: progress of a run with other settings ({', '.join(changed)}); remove it, or rerun "
                        "with those settings")
    done = {}
    for part in sorted(folder.glob("part-*.jsonl")):
        for row in read_jsonl(part):
            done[row["index"]] = row["responses"]
    return done


def write_part(folder: Path, key: str, results: dict[int, list[dict]]) -> None:
    """One progress file, named by its first prompt index (unique: that prompt is in no other part);
    the first one brings the run's key (made only now, so a run that fails to start writes nothing)."""
    if not (folder / "run_key.json").is_file():
        atomic_write_text(folder / "run_key.json", key)
    first = min(results)
    write_jsonl(folder / f"part-{first:09d}.jsonl", [{"index": i, "responses": r} for i, r in sorted(results.items())])


def sample_hf(s: Settings, d, prompts: list, indices: list[int], on_part) -> None:
    """Sample this process's prompts (`indices`) with transformers, calling on_part({index: responses})
    every save_every prompts. Prompts are taken longest first, so a part holds similar lengths."""
    tokenizer = load_tokenizer(s.model, s.trust_remote_code)
    model = load_model(s.model, inference_dtype(s.dtype, d.device, s.compute_dtype), s.trust_remote_code).to(d.device)
    ids = dict(zip(indices, encode_prompts(tokenizer, [prompts[i] for i in indices])))
    if s.max_prompt_length:
        ids = {i: x[-s.max_prompt_length:] for i, x in ids.items()}
    indices = sorted(indices, key=lambda i: -len(ids[i]))
    step = s.save_every or len(indices)
    for start in range(0, len(indices), step):
        part = indices[start:start + step]
        jobs = [(i, j) for i in part for j in range(s.n)]
        out = generate_responses(model, tokenizer, [ids[i] for i, _ in jobs],
                                 [response_seed(s.seed, i, j) for i, j in jobs], s,
                                 desc=f"sample {start + len(part)}/{len(indices)}" if d.is_main else None)
        results = {i: [] for i in part}
        for (i, _), response in zip(jobs, out):
            results[i].append({k: response[k] for k in RESPONSE_FIELDS})
        on_part(results)


def sample_vllm(s: Settings, d, prompts: list, indices: list[int], on_part) -> None:
    """Sample with vLLM: one process (vLLM spreads a model over GPUs itself); request i is seeded with
    a hash of (seed, i), so a resumed run gives the same responses, but not the ones --engine hf gives."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UserError("--engine vllm: vllm is not installed (pip install vllm), use --engine hf")
    if d.world_size > 1:
        raise UserError("--engine vllm runs as one process: start it with python, not torchrun")
    tokenizer = load_tokenizer(s.model, s.trust_remote_code)
    dtype = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[s.dtype]
    llm = LLM(s.model, dtype=dtype, seed=s.seed, trust_remote_code=s.trust_remote_code, load_format="safetensors")
    stops = {tokenizer.eos_token_id, *tokenizer.all_special_ids, *end_of_turn_ids(tokenizer)}
    ids = dict(zip(indices, encode_prompts(tokenizer, [prompts[i] for i in indices])))
    if s.max_prompt_length:
        ids = {i: x[-s.max_prompt_length:] for i, x in ids.items()}
    step = s.save_every or len(indices)
    for start in range(0, len(indices), step):
        part = indices[start:start + step]
        params = [SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 stop_token_ids=end_of_turn_ids(tokenizer),  # besides the config's eos ids
                                 seed=response_seed(s.seed, i, 0) & (2**31 - 1)) for i in part]
        outputs = llm.generate([{"prompt_token_ids": ids[i]} for i in part], params)
        results = {}
        for i, output in zip(part, outputs):
            results[i] = []
            for c in output.outputs:
                ended = c.finish_reason == "stop"
                tokens = list(c.token_ids)
                num = len(tokens) + (1 if ended and (not tokens or tokens[-1] not in stops) else 0)
                results[i].append({"text": c.text, "num_tokens": num, "finish_reason": "eos" if ended else "length"})
        on_part(results)


def assemble(rows: list[dict], results: dict[int, list[dict]], vocab: str | None) -> list[dict]:
    """Output rows in input order: each input row with its responses added, and the fingerprint of the
    vocabulary their token ids belong to (`vocab`, None when they carry no ids)."""
    extra = {"vocab_sha256": vocab} if vocab else {}
    return [{**row, **extra, "responses": results[i]} for i, row in enumerate(rows)]


def count_inner_special(responses: list[dict], special: set[int]) -> int:
    """Responses with a special token before their last one (kept in their text as it was sampled)."""
    return sum(any(t in special for t in r["token_ids"][:-1]) for r in responses if "token_ids" in r)


def output_complete(path: Path, rows: list[dict]) -> bool:
    """Whether `path` holds the samples of these prompts (another prompts file's is an error)."""
    if not path.is_file():
        return False
    done = read_jsonl(path)
    if len(done) != len(rows):
        raise UserError(f"{path}: holds {len(done)} rows but the prompts file has {len(rows)}; remove it to sample "
                        "again")
    if any(old.get("prompt") != row["prompt"] for old, row in zip(done, rows)):
        raise UserError(f"{path}: holds samples of other prompts than the prompts file; remove it to sample again")
    return True


def main(s: Settings) -> None:
    check_settings(s)
    output = Path(s.output)
    check_output_path(output, "--output", directory=False)
    check_output_path(parts_dir(s.output), "--output", directory=True)  # its progress folder
    rows = load_rows(s.prompts, required={"prompt": PROMPT})
    if output_complete(output, rows):
        print(f"{output} is complete; nothing to do (remove it to sample again)")
        if os.environ.get("RANK", "0") == "0":  # progress files a kill left right after the output was written
            shutil.rmtree(parts_dir(s.output), ignore_errors=True)
        return
    check_model_dir(s.model)  # before anything is written
    d = setup_distributed()
    folder, key = parts_dir(s.output), run_key(s, [r["prompt"] for r in rows])
    done = read_parts(folder, key)
    barrier(d)  # every process has read the parts before any writes new ones
    if d.is_main:
        print(f"sample: {len(rows)} prompts x {s.n} from {s.model} on {d.world_size} process(es)"
              + (f"; {len(done)} already done in {folder}" if done else ""))
    todo = [i for i in range(len(rows)) if i not in done]
    mine = todo[d.rank::d.world_size]
    new = {}

    def on_part(results):
        if s.save_every:
            write_part(folder, key, results)
        new.update(results)

    if mine:
        (sample_vllm if s.engine == "vllm" else sample_hf)(s, d, [r["prompt"] for r in rows], mine, on_part)
    for part in all_gather_objects(d, new):
        done.update(part)
    if d.is_main:
        tokenizer = load_tokenizer(s.model, s.trust_remote_code)
        save_settings(output.parent, s, name=f"{output.stem}_settings.json")
        vocab = vocab_sha256(tokenizer) if s.engine == "hf" else None
        write_jsonl(output, assemble(rows, done, vocab))  # last but the clean-up: its presence means the stage is done
        shutil.rmtree(folder, ignore_errors=True)
        stats = [r for responses in done.values() for r in responses]
        print(f"wrote {output}: {len(stats)} responses, mean {sum(r['num_tokens'] for r in stats) / len(stats):.1f} "
              f"tokens, {sum(r['finish_reason'] == 'length' for r in stats) / len(stats):.1%} without EOS; "
              f"{count_inner_special(stats, special_ids(tokenizer))} with a special token inside (kept in the text)")
        if s.max_prompt_length:  # counted over every prompt, so a resumed run reports the same number
            lengths = map(len, encode_prompts(tokenizer, [r["prompt"] for r in rows]))
            print(f"{sum(n > s.max_prompt_length for n in lengths)} of {len(rows)} prompts cut from the left to "
                  f"--max_prompt_length {s.max_prompt_length}")
    barrier(d)
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main, (Settings,))
