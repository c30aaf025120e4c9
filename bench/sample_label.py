"""sample.py and label.py against the loops most scripts write: same model, same inputs, same batch size.

    python bench/sample_label.py                                   # CPU: 16.8M Llama, ~5 min on 2 cores
    python bench/sample_label.py --size 135m --stages sample --prompts 32 --max_new_tokens 64   # SmolLM2-135M-shaped
    python bench/sample_label.py --size 0.5b --device cuda         # GPU: Qwen2.5-0.5B-shaped, bf16

Sampling: generated tokens per second of sample.py (prompts sorted by length into left-padded
batches, a seeded sampler per response) against HF `generate` over batches of the same number of
sequences in dataset order (each prompt's n copies side by side, left-padded by the tokenizer,
`do_sample=True`). A generated token is a response token up to and including EOS.

Scoring: responses scored per second by label.py (`--reward_model`: length-sorted batches) against
a plain loop over the same reward model (the chat template, then the tokenizer with padding, in
dataset order). The reward model is a random-init LlamaForSequenceClassification with one label and
its own tokenizer and chat template; the two sides' scores must agree, which the script checks.

Both sides compute in the same dtype: `--dtype auto` is what the stages pick (bf16 on GPU and on
CPUs with bf16 instructions, else float32), and the plain loops load the model in it too.
Both sides run in this process, one after the other, each once untimed on a few inputs first; a
time runs from loading the model to having every result (label.py also writes its pairs). Prompts
and responses have long-tailed word counts (lognormal, like real ones); every word is one token.
The random-init policy almost never emits EOS, so every sampled response runs to max_new_tokens:
that figure measures batching and the per-token cost, not early stopping. Responses that stop at
EOS at different lengths, as real ones do: `--sft_steps N` first fine-tunes the random-init policy
with sft.py (in its own process) for N steps on prompts with random-word responses of long-tailed
length (lognormal, median 48 words, capped below max_new_tokens), each ending in EOS; or `--policy
DIR --policy_prompts FILE` samples a trained policy (the first --prompts rows of FILE), e.g. the
embedded default's runs/sft.

The last line is `sample_speedup=X.XX label_speedup=Y.YY` (ours over the plain loop's).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ["TQDM_DISABLE"] = "1"  # before tqdm is imported: it reads its environment then

from brevity.config import run_main  # noqa: E402
from brevity.files import read_jsonl, write_jsonl  # noqa: E402
from dpo_vs_trl import SIZES, build_tokenizer, lognormal_lengths, rebuild_work_dir  # noqa: E402

POLICY_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                   "{% if add_generation_prompt %}<s> {% endif %}")
RM_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}</s>"  # ends where the score is read


@dataclasses.dataclass
class BenchSettings:
    size: Literal["tiny", "135m", "0.5b"] = "tiny"  # policy and reward model shape (dpo_vs_trl.SIZES)
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # both sides; auto: what sample.py and label.py pick
    prompts: int = 128  # sampling: prompts, each sampled n times
    n: int = 4  # responses per prompt
    max_new_tokens: int = 128
    sample_batch_size: int = 32  # sequences per generate call (sample.py's default)
    label_prompts: int = 512  # scoring: prompts with n synthetic responses each
    label_batch_size: int = 16  # sequences per reward-model forward (label.py's default)
    temperature: float = 1.0
    top_p: float = 1.0
    repeats: int = 1  # timed runs of each side, alternating; the best of each is reported
    threads: int = 2  # torch intra-op threads (CPU)
    seed: int = 0
    stages: str = "sample,label"  # which comparisons, comma-separated
    work_dir: str = "runs/bench_sample_label"  # models, inputs and outputs (rebuilt on every call)
    sft_steps: int = 0  # sampling: fine-tune the policy first (sft.py), so that it stops at EOS; 0: random-init
    policy: str = ""  # sampling: a trained policy directory instead of the random-init one
    policy_prompts: str = ""  # with --policy: its prompts (JSONL with `prompt`, a string or chat messages)


# Models and inputs

def words(rng, vocab_size: int, k: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(4, vocab_size, k))


def make_prompts(n: int, vocab_size: int, seed: int) -> list[str]:
    """Prompts of long-tailed length: lognormal word counts, median 32, capped at 256."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [words(rng, vocab_size, k) for k in lognormal_lengths(rng, n, 32, 0.9, 4, 256)]


def make_samples(prompts: list[str], n: int, vocab_size: int, seed: int) -> list[dict]:
    """sample.py-style rows for label.py: n finished responses per prompt, lognormal word counts
    (median 48, capped at 256)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    rows = []
    for prompt in prompts:
        lengths = lognormal_lengths(rng, n, 48, 0.8, 1, 256)
        rows.append({"prompt": prompt, "responses": [{"text": words(rng, vocab_size, k), "num_tokens": k + 1,
                                                      "finish_reason": "eos"} for k in lengths]})
    return rows


def prepare(s: BenchSettings, work: Path) -> dict:
    """Write the policy, the reward model (each with its tokenizer), prompts.jsonl and samples.jsonl."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    shape = SIZES[s.size]
    config = LlamaConfig(**shape, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(s.seed)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(work / "policy")
    tokenizer = build_tokenizer(shape["vocab_size"])
    tokenizer.chat_template = POLICY_TEMPLATE
    tokenizer.save_pretrained(work / "policy")
    reward_model = LlamaForSequenceClassification(LlamaConfig(**shape, max_position_embeddings=2048, bos_token_id=1,
                                                              eos_token_id=2, pad_token_id=0, num_labels=1))
    reward_model.save_pretrained(work / "reward_model")
    tokenizer = build_tokenizer(shape["vocab_size"])
    tokenizer.chat_template = RM_TEMPLATE
    tokenizer.save_pretrained(work / "reward_model")
    prompts = make_prompts(s.prompts, shape["vocab_size"], s.seed)
    write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in prompts])
    samples = make_samples(make_prompts(s.label_prompts, shape["vocab_size"], s.seed + 2), s.n,
                           shape["vocab_size"], s.seed)
    write_jsonl(work / "samples.jsonl", samples)
    if s.sft_steps and "sample" in s.stages.split(","):
        import subprocess

        import numpy as np

        rng = np.random.default_rng(s.seed + 3)
        sft_prompts = make_prompts(1024, shape["vocab_size"], s.seed + 3)
        lengths = lognormal_lengths(rng, len(sft_prompts), 48, 0.8, 1, s.max_new_tokens - 1)
        write_jsonl(work / "sft.jsonl", [{"prompt": p, "response": words(rng, shape["vocab_size"], k)}
                                         for p, k in zip(sft_prompts, lengths)])
        # Its own process: training sets the allocator for itself (brevity.training.start_training), and that
        # must not change the sampling runs that follow here.
        subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(work / "policy"), "--data",
                        str(work / "sft.jsonl"), "--output_dir", str(work / "policy_sft"), "--max_steps",
                        str(s.sft_steps), "--batch_size", "16", "--lr", "1e-3", "--lr_schedule", "constant",
                        "--max_length", "512", "--save_every", "0", "--seed", str(s.seed)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(s.threads)})
    return {"params": sum(p.numel() for p in policy.parameters()),
            "prompt_words": sorted(len(p.split()) for p in prompts),
            "response_words": sorted(len(r["text"].split()) for row in samples for r in row["responses"])}


# The plain loops

def plain_sample(model_dir: Path, prompts_path: Path, s: BenchSettings, device, dtype) -> int:
    """HF generate over dataset-order batches; return the number of generated tokens (EOS included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    prompts = [row["prompt"] for row in read_jsonl(prompts_path)]
    texts = [tokenizer.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}],
                                           tokenize=False, add_generation_prompt=True)
             for p in prompts for _ in range(s.n)]
    generated = 0
    for start in range(0, len(texts), s.sample_batch_size):
        batch = tokenizer(texts[start:start + s.sample_batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=None,
                                 max_new_tokens=s.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        for row in new.tolist():
            generated += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        tokenizer.batch_decode(new, skip_special_tokens=True)
    return generated


def plain_score(model_dir: Path, samples_path: Path, s: BenchSettings, device, dtype) -> list[float]:
    """The reward model over dataset-order batches; return the scores in input order."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    rows = read_jsonl(samples_path)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                            {"role": "assistant", "content": r["text"]}], tokenize=False)
             for row in rows for r in row["responses"]]
    scores = []
    for start in range(0, len(texts), s.label_batch_size):
        batch = tokenizer(texts[start:start + s.label_batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.no_grad():
            scores += model(**batch).logits[:, 0].float().tolist()
    return scores


# Ours: the stages themselves

def our_sample(model_dir: Path, prompts_path: Path, out: Path, s: BenchSettings) -> int:
    import sample

    sample.main(sample.Settings(model=str(model_dir), prompts=str(prompts_path), output=str(out), n=s.n,
                                temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                batch_size=s.sample_batch_size, seed=s.seed, save_every=0, dtype=s.dtype))
    return sum(r["num_tokens"] for row in read_jsonl(out) for r in row["responses"])


def our_label(model_dir: Path, samples_path: Path, out: Path, s: BenchSettings) -> list[float]:
    import label

    label.main(label.Settings(samples=str(samples_path), output_dir=str(out), reward_model=str(model_dir),
                              batch_size=s.label_batch_size, dtype=s.dtype))
    return [r["score"] for row in read_jsonl(out / "scores.jsonl") for r in row["responses"]]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def head(path: Path, out: Path, n: int) -> Path:
    """The first n rows of a JSONL file, for the untimed warm-up runs."""
    write_jsonl(out, read_jsonl(path)[:n])
    return out


def compare_sampling(s: BenchSettings, work: Path, device, dtype) -> dict:
    policy, prompts = work / ("policy_sft" if s.sft_steps else "policy"), work / "prompts.jsonl"
    if s.policy:
        policy = Path(s.policy).resolve()
        prompts = head(Path(s.policy_prompts), work / "policy_prompts.jsonl", s.prompts)
    warm = dataclasses.replace(s, max_new_tokens=4)
    small = head(prompts, work / "prompts_warmup.jsonl", 4)
    plain_sample(policy, small, warm, device, dtype)
    our_sample(policy, small, work / "warmup" / "samples.jsonl", warm)
    best = {"plain": math.inf, "ours": math.inf}
    tokens = {}
    for rep in range(s.repeats):
        seconds, tokens["plain"] = timed(plain_sample, policy, prompts, s, device, dtype)
        best["plain"] = min(best["plain"], seconds)
        seconds, tokens["ours"] = timed(our_sample, policy, prompts, work / f"sampled_{rep}" / "samples.jsonl", s)
        best["ours"] = min(best["ours"], seconds)
    n = len(read_jsonl(prompts)) * s.n
    return {k: {"seconds": best[k], "responses": n, "tokens": tokens[k], "per_s": tokens[k] / best[k]} for k in best}


def compare_scoring(s: BenchSettings, work: Path, device, dtype) -> dict:
    import torch

    small = head(work / "samples.jsonl", work / "samples_warmup.jsonl", 4)
    plain_score(work / "reward_model", small, s, device, dtype)
    our_label(work / "reward_model", small, work / "warmup_label", s)
    best = {"plain": math.inf, "ours": math.inf}
    scores = {}
    for rep in range(s.repeats):
        seconds, scores["plain"] = timed(plain_score, work / "reward_model", work / "samples.jsonl", s, device, dtype)
        best["plain"] = min(best["plain"], seconds)
        seconds, scores["ours"] = timed(our_label, work / "reward_model", work / "samples.jsonl",
                                        work / f"labelled_{rep}", s)
        best["ours"] = min(best["ours"], seconds)
    # The same numbers from both sides, or the comparison is not of the same work (bf16: looser).
    worst = max(abs(a - b) for a, b in zip(scores["plain"], scores["ours"], strict=True))
    if worst > (1e-3 if dtype == torch.float32 else 5e-2):
        raise SystemExit(f"label.py and the plain loop disagree: a score differs by {worst:.2e}")
    n = len(scores["ours"])
    return {k: {"seconds": best[k], "responses": n, "per_s": n / best[k]} for k in best}


def main(s: BenchSettings) -> None:
    if s.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # sample.py and label.py would take a GPU if they saw one
    import torch

    if bool(s.policy) != bool(s.policy_prompts) or (s.policy and s.sft_steps):
        raise SystemExit("--policy and --policy_prompts go together, and not with --sft_steps")
    if s.sft_steps < 0:
        raise SystemExit(f"--sft_steps {s.sft_steps}: need >= 0")
    torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    from brevity.models import inference_dtype

    dtype = inference_dtype(s.dtype, device)  # what sample.py and label.py load the models in
    work = rebuild_work_dir(s.work_dir, "bench/sample_label.py")
    info = prepare(s, work)
    pw, rw = info["prompt_words"], info["response_words"]
    print(f"model: {s.size} Llama, {info['params']:,} parameters (the reward model has the same shape), "
          f"{str(dtype).removeprefix('torch.')}; {s.threads} threads; prompt words median {pw[len(pw) // 2]}, p90 {pw[int(0.9 * len(pw))]}, max {pw[-1]}; "
          f"responses to score: words median {rw[len(rw) // 2]}, p90 {rw[int(0.9 * len(rw))]}, max {rw[-1]}",
          flush=True)
    lines = ["| stage | what | ours | plain loop | ours / plain |", "|---|---|---|---|---|"]
    ratios = {}
    stages = s.stages.split(",")
    if unknown := set(stages) - {"sample", "label"}:
        raise SystemExit(f"unknown stages {sorted(unknown)}")
    if "sample" in stages:
        r = compare_sampling(s, work, device, dtype)
        ratios["sample"] = r["ours"]["per_s"] / r["plain"]["per_s"]
        print(json.dumps({"sample": r}), flush=True)
        n = r["ours"]["responses"]
        which = f"policy {s.policy}, " if s.policy else f"policy after {s.sft_steps} SFT steps, " if s.sft_steps else ""
        lines.append(f"| sample.py | generated tokens/s ({which}{n // s.n} prompts x {s.n}, {s.max_new_tokens} new "
                     f"tokens at most, batch {s.sample_batch_size}; mean response {r['ours']['tokens'] / n:.1f} / "
                     f"{r['plain']['tokens'] / n:.1f} tokens) | {r['ours']['per_s']:.0f} | {r['plain']['per_s']:.0f} | "
                     f"{ratios['sample']:.2f} |")
    if "label" in stages:
        r = compare_scoring(s, work, device, dtype)
        ratios["label"] = r["ours"]["per_s"] / r["plain"]["per_s"]
        print(json.dumps({"label": r}), flush=True)
        lines.append(f"| label.py | responses scored/s ({r['ours']['responses']}, batch {s.label_batch_size}) | "
                     f"{r['ours']['per_s']:.1f} | {r['plain']['per_s']:.1f} | {ratios['label']:.2f} |")
    print()
    print("\n".join(lines))
    print()
    print(" ".join(f"{k}_speedup={v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    run_main(main, (BenchSettings,))
