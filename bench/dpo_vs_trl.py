"""dpo.py against TRL's DPOTrainer: one model, one set of pairs, the same batch, length, steps and loss.

    python bench/dpo_vs_trl.py                                  # CPU: 16.8M-parameter Llama, ~8 min on 2 cores
    python bench/dpo_vs_trl.py --size 0.5b --device cuda        # GPU: Qwen2.5-0.5B-shaped Llama, bf16
    python bench/dpo_vs_trl.py --size 0.5b --device cuda --nproc 8   # dpo.py under torchrun (FSDP2)

The harness builds a random-init Llama (from a LlamaConfig), a word-level tokenizer and synthetic
preference pairs with long-tailed lengths, then trains three times, each in its own process:
dpo.py (`--loss dpo`), TRL's DPOTrainer with its defaults (a live reference model), and TRL with
`precompute_ref_log_probs=True`. Everything that can be matched is: seed, the pairs (one epoch of
exactly `(warmup + steps) * batch_size`), batch 8, max length 256, sigmoid DPO with beta 0.1,
AdamW at the same lr, constant schedule, grad-norm clip 1.0, activation checkpointing (on by
default on both sides; --activation_checkpointing false turns it off on both), fp32 on CPU (bf16
autocast on GPU), no eval, no saving, dataloader workers 0, and the same number of intra-op threads
(`OMP_NUM_THREADS`, `torch.set_num_threads`). What differs is each side's own way: dpo.py computes
the reference log-probs in one length-sorted pass and buckets its batches by length; TRL goes
through the pairs in dataset order.

What is measured, the same way for every run:
  - pairs/s and tokens/s over the epoch: every pair over (reference log-probs + every training
    step), the same work on every side whether it precomputes the reference or not. A token is a
    non-pad prompt or response token of the chosen or the rejected sequence (EOS included).
  - pairs/s and tokens/s over the timed steps alone (after `--warmup`), from per-step end times
    (dpo.py's metrics.jsonl; a Trainer callback for TRL). The pairs in them differ between runs
    (bucketing), so compare tokens/s there.
  - peak resident memory of the whole process tree, polled by this process with psutil every
    50 ms (and the kernel's ru_maxrss from wait4 as a cross-check); on GPU also the peak CUDA
    memory in use by the tree, polled with nvidia-smi, and MFU = 6 * params * tokens/s of the
    timed steps / (peak_tflops per device x devices); the reference forward is not counted, so MFU
    is a lower bound, most of all for the live-reference run.

The last line is `speedup=X.XX memory_ratio=Y.YY`: our epoch pairs/s over the faster TRL run's, and
our peak memory (RSS on CPU, CUDA on GPU) over that same run's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from brevity.config import run_main  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MARKER = ".bench_work_dir"  # the work dir is deleted on every run only if it holds this file

# Model shapes. tiny: 16.8M parameters, vocab 8000 (small enough for a 2-core CPU).
# 0.5b: Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, tied embeddings,
# q/k/v bias) as a Llama config; Llama also puts a bias on o_proj, 0.9M parameters more.
SIZES = {
    "tiny": dict(vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                 attention_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


@dataclasses.dataclass
class BenchSettings:
    size: Literal["tiny", "0.5b"] = "tiny"  # model shape, see SIZES
    device: Literal["cpu", "cuda"] = "cpu"
    steps: int = 30  # timed optimizer steps, after the warm-up ones
    warmup: int = 5  # untimed steps at the start of each run
    batch_size: int = 8  # global pairs per optimizer step
    max_length: int = 256  # prompt + response tokens; the data never exceeds it
    lr: float = 5e-7
    beta: float = 0.1
    seed: int = 0
    activation_checkpointing: bool = True  # both sides: dpo.py's default and TRL's (DPOConfig.gradient_checkpointing)
    threads: int = 2  # intra-op CPU threads for every run (OMP_NUM_THREADS and torch.set_num_threads)
    nproc: int = 1  # GPU only: dpo.py processes under torchrun (FSDP2); TRL runs on one device
    peak_tflops: float = 989.0  # per-device dense peak for MFU; H100 SXM bf16
    runs: str = "ours,trl,trl_precompute"  # which runs, comma-separated
    work_dir: str = "runs/bench_dpo"  # model, data and run outputs (rebuilt on every call)
    runner: str = ""  # internal: "trl" runs one TRL training in this process
    precompute: bool = False  # internal: TRL's precompute_ref_log_probs


# Model, tokenizer and data

def build_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer: 4 specials, then words w4 ... w{vocab_size-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def lognormal_lengths(rng, n: int, median: float, sigma: float, low: int, high: int):
    return [int(min(high, max(low, round(x)))) for x in rng.lognormal(math.log(median), sigma, n)]


def make_pairs(n: int, vocab_size: int, max_length: int, seed: int) -> list[dict]:
    """Preference pairs with long-tailed lengths like real ones: lognormal prompt (median 32 words)
    and response (median 48) lengths, capped so prompt + response + EOS <= max_length.

    The responses begin with a space so that TRL's `prompt + chosen` tokenizes to the prompt's
    tokens followed by the response's, exactly what dpo.py encodes separately.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_lens = lognormal_lengths(rng, n, 32, 0.9, 4, max_length // 2)
    rows = []
    for plen in prompt_lens:
        budget = max_length - plen - 1
        chosen_len, rejected_len = lognormal_lengths(rng, 2, 48, 0.8, 1, budget)

        def words(k):
            return " ".join(f"w{i}" for i in rng.integers(len(SPECIALS), vocab_size, k))

        rows.append({"prompt": words(plen), "chosen": " " + words(chosen_len), "rejected": " " + words(rejected_len)})
    return rows


def pair_tokens(row: dict) -> int:
    """Non-pad tokens of a pair: (prompt + chosen + EOS) + (prompt + rejected + EOS)."""
    p, c, r = (len(row[k].split()) for k in ("prompt", "chosen", "rejected"))
    return 2 * p + c + r + 2


def prepare(s: BenchSettings, work: Path) -> dict:
    """Write the model directory and pairs.jsonl; return facts about them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from brevity.files import write_jsonl

    shape = SIZES[s.size]
    tokenizer = build_tokenizer(shape["vocab_size"])
    config = LlamaConfig(**shape, max_position_embeddings=max(2048, s.max_length), bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    n_pairs = (s.warmup + s.steps) * s.batch_size
    rows = make_pairs(n_pairs, shape["vocab_size"], s.max_length, s.seed)
    write_jsonl(work / "pairs.jsonl", rows)
    # The harness's word count must equal what the tokenizer produces, or tokens/s would be wrong.
    for row in rows[:16]:
        ids = tokenizer(row["prompt"] + row["chosen"] + "</s>", add_special_tokens=False)["input_ids"]
        assert len(ids) == len(row["prompt"].split()) + len(row["chosen"].split()) + 1
    tokens = [pair_tokens(r) for r in rows]
    return {"params": n_params, "pairs": n_pairs, "tokens_per_pair": tokens,
            "seq_lens": [len(r["prompt"].split()) + len(r[k].split()) + 1
                         for r in rows for k in ("chosen", "rejected")]}


# Running one training in a child process, measuring its memory from outside

def gpu_memory_mib(pids: set[int]) -> float:
    """CUDA memory in use by these processes, from nvidia-smi (0 when it is missing)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    total = 0.0
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            total += float(parts[1])
    return total


def run_measured(cmd: list[str], env: dict, log_path: Path, cuda: bool) -> dict:
    """Run `cmd`, polling the RSS summed over it and all its descendants; fail loudly on error."""
    import psutil

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        peak_rss = peak_gpu = 0.0
        last_gpu_poll = 0.0
        start = time.perf_counter()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                tree = [ps] + ps.children(recursive=True)
                rss = 0
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                peak_rss = max(peak_rss, rss)
                if cuda and time.perf_counter() - last_gpu_poll > 0.5:
                    last_gpu_poll = time.perf_counter()
                    peak_gpu = max(peak_gpu, gpu_memory_mib({p.pid for p in tree}))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}; last lines of {log_path}:\n"
                         + "\n".join(tail))
    return {"peak_rss_gib": peak_rss / 2**30, "ru_maxrss_gib": usage.ru_maxrss / 2**20,
            "peak_cuda_gib": peak_gpu / 1024, "wall_s": wall}


def child_env(s: BenchSettings) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads),
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def dpo_command(s: BenchSettings, work: Path, out: Path) -> list[str]:
    """dpo.py with the settings TRL gets below."""
    n_steps = s.warmup + s.steps
    args = ["dpo.py", "--model", str(work / "model"), "--data", str(work / "pairs.jsonl"),
            "--output_dir", str(out), "--loss", "dpo", "--beta", str(s.beta), "--lr", str(s.lr),
            "--batch_size", str(s.batch_size), "--max_length", str(s.max_length), "--max_steps", str(n_steps),
            "--seed", str(s.seed), "--lr_schedule", "constant", "--warmup_steps", "0", "--save_every", "0",
            "--activation_checkpointing", str(s.activation_checkpointing).lower()]
    if s.device == "cuda":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(s.nproc),
                *args]
    return [sys.executable] + args


def read_dpo_metrics(out: Path) -> dict:
    """Per-step end times, tokens and the reference precompute time from dpo.py's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step" in r and "loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    return {"step_end": [r["time"] for r in steps], "step_tokens": [r.get("tokens") for r in steps],
            "train_start": summary["train_start"], "precompute_s": summary["ref_logps_s"]}


# The TRL run, in its own process

def run_trl(s: BenchSettings) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from brevity.files import read_jsonl

    torch.set_num_threads(s.threads)
    work = Path(s.work_dir)
    out = work / ("trl_precompute" if s.precompute else "trl")
    record = {"step_end": [], "step_tokens": [], "precompute_s": 0.0}

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            result = super()._precompute_ref_logps(dataset, name, batch_size)
            record["precompute_s"] += time.perf_counter() - t
            return result

        def training_step(self, model, inputs, num_items_in_batch=None):
            record["step_tokens"].append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record["train_start"] = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record["step_end"].append(time.time())

    t0 = time.time()
    cuda = s.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    dataset = Dataset.from_list(read_jsonl(work / "pairs.jsonl"))
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=s.batch_size, max_length=s.max_length,
        max_steps=s.warmup + s.steps, learning_rate=s.lr, beta=s.beta, loss_type=["sigmoid"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=cuda, fp16=False, use_cpu=not cuda, gradient_checkpointing=s.activation_checkpointing,
        precompute_ref_log_probs=s.precompute, train_sampling_strategy="sequential",
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10**6, disable_tqdm=True,
        dataloader_num_workers=0, seed=s.seed, data_seed=s.seed,
    )
    trainer = Timed(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                    callbacks=[StepClock()])
    record["setup_s"] = time.time() - t0
    trainer.train()
    if cuda:
        record["trl_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    record["threads"] = torch.get_num_threads()
    (out / "bench_record.json").write_text(json.dumps(record))


# Summary

def summarize(name: str, rec: dict, info: dict, s: BenchSettings, mem: dict) -> dict:
    """Throughput over the epoch (reference log-probs + every step: the same work on every side) and
    over the timed steps alone (after the warm-up; the pairs in them differ between runs, since
    dpo.py buckets by length and TRL goes in dataset order, so tokens/s is the like-for-like there)."""
    ends = rec["step_end"]
    n = s.warmup + s.steps
    if len(ends) != n:
        raise SystemExit(f"{name}: expected {n} step times, got {len(ends)}")
    timed_s = ends[-1] - (ends[s.warmup - 1] if s.warmup else rec["train_start"])
    epoch_s = ends[-1] - rec["train_start"] + rec["precompute_s"]
    step_tokens = rec["step_tokens"][s.warmup:]
    if any(t is None for t in step_tokens):
        raise SystemExit(f"{name}: a step without its token count")
    row = {
        "run": name,
        "pairs_s": n * s.batch_size / epoch_s,
        "tokens_s": sum(info["tokens_per_pair"]) / epoch_s,
        "step_pairs_s": s.steps * s.batch_size / timed_s,
        "step_tokens_s": sum(step_tokens) / timed_s,
        "precompute_s": rec["precompute_s"],
        "epoch_s": epoch_s,
        **mem,
    }
    if s.device == "cuda":  # per device; the live reference forward is not counted
        devices = s.nproc if name == "ours" else 1
        row["mfu"] = 6 * info["params"] * row["step_tokens_s"] / (s.peak_tflops * 1e12 * devices)
    return row


def markdown_table(rows: list[dict], best_trl: dict, cuda: bool) -> str:
    mem_key = "peak_cuda_gib" if cuda else "peak_rss_gib"
    head = ["run", "pairs/s", "tokens/s", "ref log-probs s", "pairs/s, timed steps", "tokens/s, timed steps",
            "peak RSS GiB", "ru_maxrss GiB"]
    head += ["peak CUDA GiB", "MFU"] if cuda else []
    head += ["pairs/s / best TRL", f"peak {'CUDA' if cuda else 'RSS'} / best TRL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], f"{r['pairs_s']:.2f}", f"{r['tokens_s']:.0f}", f"{r['precompute_s']:.1f}",
                 f"{r['step_pairs_s']:.2f}", f"{r['step_tokens_s']:.0f}", f"{r['peak_rss_gib']:.2f}",
                 f"{r['ru_maxrss_gib']:.2f}"]
        cells += [f"{r['peak_cuda_gib']:.2f}", f"{100 * r['mfu']:.1f}%"] if cuda else []
        cells += [f"{r['pairs_s'] / best_trl['pairs_s']:.2f}", f"{r[mem_key] / best_trl[mem_key]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(s: BenchSettings) -> None:
    if s.runner == "trl":
        return run_trl(s)
    work = Path(s.work_dir)
    if not work.is_absolute():
        work = ROOT / work
        s = dataclasses.replace(s, work_dir=str(work))
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise SystemExit(f"--work_dir {work}: not empty and not made by this script; choose another")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by bench/dpo_vs_trl.py; removed and rebuilt on every run\n")
    info = prepare(s, work)
    lens = sorted(info["seq_lens"])
    print(f"model: {s.size} Llama, {info['params']:,} parameters; {info['pairs']} pairs, sequence length "
          f"median {lens[len(lens) // 2]}, p90 {lens[int(0.9 * len(lens))]}, max {lens[-1]} (cap {s.max_length}); "
          f"{s.warmup} warm-up + {s.steps} timed steps of {s.batch_size} pairs; {s.threads} threads", flush=True)
    env = child_env(s)
    cuda = s.device == "cuda"
    rows = []
    for name in s.runs.split(","):
        out = work / name
        if name == "ours":
            cmd = dpo_command(s, work, out)
        elif name in ("trl", "trl_precompute"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--runner", "trl", "--work_dir", str(work),
                   "--size", s.size, "--device", s.device, "--steps", str(s.steps), "--warmup", str(s.warmup),
                   "--batch_size", str(s.batch_size), "--max_length", str(s.max_length), "--lr", str(s.lr),
                   "--beta", str(s.beta), "--seed", str(s.seed), "--threads", str(s.threads),
                   "--activation_checkpointing", str(s.activation_checkpointing).lower()]
            cmd += ["--precompute"] if name == "trl_precompute" else []
        else:
            raise SystemExit(f"unknown run {name!r}")
        out.mkdir(parents=True, exist_ok=True)
        print(f"running {name}: {' '.join(cmd)}", flush=True)
        mem = run_measured(cmd, env, out.parent / f"{name}.log", cuda)
        rec = read_dpo_metrics(out) if name == "ours" else json.loads((out / "bench_record.json").read_text())
        row = summarize(name, rec, info, s, mem)
        print(json.dumps(row), flush=True)
        rows.append(row)
    trl_rows = [r for r in rows if r["run"] != "ours"]
    best_trl = max(trl_rows, key=lambda r: r["pairs_s"]) if trl_rows else rows[0]
    print()
    print(markdown_table(rows, best_trl, cuda))
    ours = next((r for r in rows if r["run"] == "ours"), None)
    if ours and trl_rows:
        mem_key = "peak_cuda_gib" if cuda else "peak_rss_gib"
        print(f"\nfaster TRL run: {best_trl['run']}")
        print(f"speedup={ours['pairs_s'] / best_trl['pairs_s']:.2f} "
              f"memory_ratio={ours[mem_key] / best_trl[mem_key]:.2f}")


if __name__ == "__main__":
    run_main(main, (BenchSettings,))
