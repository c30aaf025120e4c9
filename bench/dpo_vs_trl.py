"""dpo.py against TRL's DPOTrainer: one model, one set of pairs, the same batch, length, steps and loss.

    python bench/dpo_vs_trl.py                                  # CPU: 16.8M-parameter Llama, 7 runs, ~15 min on 2 cores
    python bench/dpo_vs_trl.py --size 135m --steps 6 --warmup 2 # CPU: SmolLM2-135M-shaped Llama
    python bench/dpo_vs_trl.py --size 0.5b --device cuda --runs ours,trl_bf16,trl_precompute_bf16   # GPU
    python bench/dpo_vs_trl.py --size 0.5b --device cuda --nproc 8   # dpo.py under torchrun (FSDP2)

The harness builds a random-init Llama (from a LlamaConfig), a word-level tokenizer and synthetic
preference pairs with long-tailed lengths, then trains once per run, each in its own process:
`ours` (dpo.py `--loss dpo` with its default `--compute_dtype auto`: bf16 on GPU and on CPUs with
bf16 instructions), `ours_two_rows` (`ours` with `--shared_prompt false`: chosen and rejected as two
padded sequences, as TRL has them), `ours_fp32` (dpo.py `--compute_dtype float32`), `ours_compile`
(`ours` with `--torch_compile`: its compile time falls in the warm-up steps and the epoch), and TRL's DPOTrainer four
ways: `trl` (its defaults: a live reference model, fp32), `trl_bf16` (`bf16=True`: autocast, as
its Trainer does on CPU and GPU), `trl_precompute` and `trl_precompute_bf16`
(`precompute_ref_log_probs=True`). Everything that can be matched is: seed, the pairs (one epoch
of exactly `(warmup + steps) * batch_size`), batch 8, max length 256, sigmoid DPO with beta 0.1,
AdamW at the same lr, constant schedule, grad-norm clip 1.0, fp32 master weights, activation
checkpointing (on by default on both sides; --activation_checkpointing false turns it off on both),
no eval, no saving, dataloader workers 0, and the same number of intra-op threads
(`OMP_NUM_THREADS`, `torch.set_num_threads`). What differs is each side's own way: dpo.py computes
the reference log-probs in one length-sorted pass, puts a pair in one row with its prompt once,
buckets its batches by length and runs the LM head on response tokens only; TRL goes through the
pairs in dataset order, each pair as two sequences.

What is measured, the same way for every run:
  - pairs/s and tokens/s over the epoch: every pair over (reference log-probs + every training
    step), the same work on every side whether it precomputes the reference or not. A token is a
    non-pad prompt or response token of the chosen or the rejected sequence (EOS included).
  - pairs/s and tokens/s over the timed steps alone (after `--warmup`), from per-step end times
    (dpo.py's metrics.jsonl; a Trainer callback for TRL). The pairs in them differ between runs
    (bucketing), so compare tokens/s there.
  - MFU of the timed steps: the useful FLOPs over their time over the peak FLOP/s of the precision
    the run computes in. Useful FLOPs per training step: 6 x (decoder-layer and final-norm
    parameters x the tokens the model computes + LM-head parameters x response tokens; with dpo.py's
    shared prompt a pair's prompt counts once, so MFU is what the run makes of the hardware, and
    its lead in pairs/s includes what it saves), the head only where a log-prob is
    used; the input embedding (a lookup) and attention's T^2 terms are not counted, nor is
    recomputation (activation checkpointing) or the LM head over prompt and padding positions; a
    live reference forward adds 2 x the same. On CPU the peak is measured here, in this process
    with the runs' thread count, as the best of timed fp32 and bf16 matrix multiplies (2048^3 and
    the model's MLP shapes), before each run and after the last; MFU is against the best of them
    all, and also against the better of the two measured just around the run (a shared VM's speed
    drifts by tens of percent within minutes); on GPU it is --peak_tflops per device.
  - peak resident memory of the whole process tree, polled by this process with psutil every
    50 ms (and the kernel's ru_maxrss from wait4 as a cross-check); on GPU also the peak CUDA
    memory in use by the tree, polled with nvidia-smi.
  - the loss: mean over the epoch's steps and at the last step (the pairs are the same, their
    order differs).

The last line is `speedup=X.XX memory_ratio=Y.YY mfu=Z.ZZ`: our (`ours`) epoch pairs/s over the
fastest TRL run's, our peak memory (RSS on CPU, CUDA on GPU) over that same run's, and our MFU.
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
# 135m: SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied embeddings).
# 0.5b: Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, tied embeddings,
# q/k/v bias) as a Llama config; Llama also puts a bias on o_proj, 0.9M parameters more.
SIZES = {
    "tiny": dict(vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False),
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                 rms_norm_eps=1e-5),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                 attention_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


@dataclasses.dataclass
class BenchSettings:
    size: Literal["tiny", "135m", "0.5b"] = "tiny"  # model shape, see SIZES
    device: Literal["cpu", "cuda"] = "cpu"
    steps: int = 20  # timed optimizer steps, after the warm-up ones
    warmup: int = 5  # untimed steps at the start of each run
    batch_size: int = 8  # global pairs per optimizer step
    max_length: int = 256  # prompt + response tokens; the data never exceeds it
    length_scale: float = 1.0  # multiplies the median prompt (32) and response (48) lengths, e.g. 8 at max_length 1024
    lr: float = 5e-7
    beta: float = 0.1
    seed: int = 0
    activation_checkpointing: bool = True  # both sides: dpo.py's default and TRL's (DPOConfig.gradient_checkpointing)
    threads: int = 2  # intra-op CPU threads for every run (OMP_NUM_THREADS and torch.set_num_threads)
    nproc: int = 1  # GPU only: dpo.py processes under torchrun (FSDP2); TRL runs on one device
    peak_tflops: float = 989.0  # GPU: per-device dense peak for MFU (H100 SXM bf16); on CPU the bench measures it
    runs: str = ("ours,ours_two_rows,ours_fp32,ours_compile,"  # comma-separated
                 "trl,trl_bf16,trl_precompute,trl_precompute_bf16")
    work_dir: str = "runs/bench_dpo"  # model, data and run outputs (rebuilt on every call)
    runner: str = ""  # internal: "trl" runs one TRL training in this process
    precompute: bool = False  # internal: TRL's precompute_ref_log_probs
    bf16: bool = False  # internal: TRL's bf16 (autocast)


def rebuild_work_dir(work_dir: str, script: str) -> Path:
    """`work_dir` as an absolute path (a relative one is the repository's), emptied and marked as made by
    `script`. One that holds anything but no MARKER was not made by a bench script: refused, not deleted."""
    work = Path(work_dir) if Path(work_dir).is_absolute() else ROOT / work_dir
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise SystemExit(f"--work_dir {work}: not empty and not made by this script; choose another")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).write_text(f"made by {script}; removed and rebuilt on every run\n")
    return work


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


def make_pairs(n: int, vocab_size: int, max_length: int, seed: int, length_scale: float = 1.0) -> list[dict]:
    """Preference pairs with long-tailed lengths like real ones: lognormal prompt (median 32 words)
    and response (median 48) lengths, both times `length_scale`, capped so prompt + response + EOS
    <= max_length.

    The responses begin with a space so that TRL's `prompt + chosen` tokenizes to the prompt's
    tokens followed by the response's, exactly what dpo.py encodes separately.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_lens = lognormal_lengths(rng, n, 32 * length_scale, 0.9, 4, max_length // 2)
    rows = []
    for plen in prompt_lens:
        budget = max_length - plen - 1
        chosen_len, rejected_len = lognormal_lengths(rng, 2, 48 * length_scale, 0.8, 1, budget)

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
    body = sum(p.numel() for m in (model.model.layers, model.model.norm) for p in m.parameters())
    model.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    n_pairs = (s.warmup + s.steps) * s.batch_size
    rows = make_pairs(n_pairs, shape["vocab_size"], s.max_length, s.seed, s.length_scale)
    write_jsonl(work / "pairs.jsonl", rows)
    # The harness's word count must equal what the tokenizer produces, or tokens/s would be wrong.
    for row in rows[:16]:
        ids = tokenizer(row["prompt"] + row["chosen"] + "</s>", add_special_tokens=False)["input_ids"]
        assert len(ids) == len(row["prompt"].split()) + len(row["chosen"].split()) + 1
    tokens = [pair_tokens(r) for r in rows]
    return {"params": n_params, "body_params": body, "head_params": model.lm_head.weight.numel(),
            "pairs": n_pairs, "tokens_per_pair": tokens,
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


def dpo_command(s: BenchSettings, work: Path, out: Path, compute_dtype: str,
                torch_compile: bool = False, shared_prompt: bool = True) -> list[str]:
    """dpo.py with the settings TRL gets below (and --torch_compile, --shared_prompt false if asked)."""
    n_steps = s.warmup + s.steps
    args = ["dpo.py", "--model", str(work / "model"), "--data", str(work / "pairs.jsonl"),
            "--output_dir", str(out), "--loss", "dpo", "--beta", str(s.beta), "--lr", str(s.lr),
            "--batch_size", str(s.batch_size), "--max_length", str(s.max_length), "--max_steps", str(n_steps),
            "--seed", str(s.seed), "--lr_schedule", "constant", "--warmup_steps", "0", "--save_every", "0",
            "--activation_checkpointing", str(s.activation_checkpointing).lower(), "--compute_dtype", compute_dtype,
            "--torch_compile", str(torch_compile).lower(), "--shared_prompt", str(shared_prompt).lower()]
    if s.device == "cuda":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(s.nproc),
                *args]
    return [sys.executable] + args


def read_dpo_metrics(out: Path, batch_size: int) -> dict:
    """Per-step end times, tokens, response tokens and losses, and the reference precompute time, from
    dpo.py's metrics.jsonl (its lengths are means over the batch) and summary.json."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step" in r and "loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    return {"step_end": [r["time"] for r in steps], "step_tokens": [r.get("tokens") for r in steps],
            "step_model_tokens": [r.get("model_tokens") for r in steps],
            "step_response_tokens": [round((r["length/chosen"] + r["length/rejected"]) * batch_size) for r in steps],
            "step_loss": [r["loss"] for r in steps],
            "train_start": summary["train_start"], "precompute_s": summary["ref_logps_s"]}


# The TRL run, in its own process

def trl_run_name(precompute: bool, bf16: bool) -> str:
    return "trl" + ("_precompute" if precompute else "") + ("_bf16" if bf16 else "")


def run_trl(s: BenchSettings) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from brevity.files import read_jsonl

    torch.set_num_threads(s.threads)
    work = Path(s.work_dir)
    out = work / trl_run_name(s.precompute, s.bf16)
    record = {"step_end": [], "step_tokens": [], "step_response_tokens": [], "step_loss": [], "precompute_s": 0.0}

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            result = super()._precompute_ref_logps(dataset, name, batch_size)
            record["precompute_s"] += time.perf_counter() - t
            return result

        def training_step(self, model, inputs, num_items_in_batch=None):
            record["step_tokens"].append(int(inputs["attention_mask"].sum()))
            record["step_response_tokens"].append(int(inputs["completion_mask"].sum()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            record["step_loss"].append(float(loss))
            return loss

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
        bf16=s.bf16, fp16=False, use_cpu=not cuda, gradient_checkpointing=s.activation_checkpointing,
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


# Runs, peak FLOP/s, summary

def run_spec(name: str) -> dict:
    """What a run name means: dpo.py ("ours", with --compute_dtype auto; "ours_fp32", "ours_bf16";
    "ours_compile", auto with --torch_compile) or TRL ("trl", with "_precompute" for precomputed
    reference log-probs and "_bf16" for bf16=True)."""
    computes = {"ours": "auto", "ours_fp32": "float32", "ours_bf16": "bfloat16", "ours_compile": "auto",
                "ours_two_rows": "auto"}
    if name in computes:
        return {"trl": False, "compute": computes[name], "compile": name == "ours_compile",
                "shared_prompt": name != "ours_two_rows", "live_reference": False}
    for precompute in (False, True):
        for bf16 in (False, True):
            if name == trl_run_name(precompute, bf16):
                return {"trl": True, "compute": "bfloat16" if bf16 else "float32", "precompute": precompute,
                        "live_reference": not precompute}
    raise SystemExit(f"unknown run {name!r}")


def matmul_flops(dtype, device: str, shapes: list[tuple[int, int, int]], repeats: int = 5) -> float:
    """The best FLOP/s of `repeats` timed products a @ b of each [m, k] x [k, n] in `shapes` (2mkn FLOPs),
    after one untimed."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
        a @ b
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def measure_peaks(s: BenchSettings) -> dict[str, float]:
    """{"float32": FLOP/s, "bfloat16": FLOP/s}: square 2048 products and the model's MLP shapes, on
    --threads threads."""
    import torch

    torch.set_num_threads(s.threads)
    shape = SIZES[s.size]
    shapes = [(2048, 2048, 2048), (2048, shape["hidden_size"], shape["intermediate_size"]),
              (2048, shape["intermediate_size"], shape["hidden_size"])]
    return {name: matmul_flops(dtype, s.device, shapes) for name, dtype in
            (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


def useful_flops(info: dict, tokens: int, response_tokens: int, live_reference: bool) -> float:
    """6 x (decoder-layer and final-norm parameters x tokens + LM-head parameters x response tokens):
    forward and backward of the work a step needs; 8 x with a live reference forward in the step."""
    return (8 if live_reference else 6) * (info["body_params"] * tokens + info["head_params"] * response_tokens)


def summarize(name: str, rec: dict, info: dict, s: BenchSettings, mem: dict, peak_flops: float) -> dict:
    """Throughput over the epoch (reference log-probs + every step: the same work on every side) and
    over the timed steps alone (after the warm-up; the pairs in them differ between runs, since
    dpo.py buckets by length and TRL goes in dataset order, so tokens/s is the like-for-like there);
    MFU of the timed steps against `peak_flops` (`useful_flops`); the loss."""
    ends = rec["step_end"]
    n = s.warmup + s.steps
    if len(ends) != n:
        raise SystemExit(f"{name}: expected {n} step times, got {len(ends)}")
    timed_s = ends[-1] - (ends[s.warmup - 1] if s.warmup else rec["train_start"])
    epoch_s = ends[-1] - rec["train_start"] + rec["precompute_s"]
    step_tokens, step_responses = rec["step_tokens"][s.warmup:], rec["step_response_tokens"][s.warmup:]
    model_tokens = rec.get("step_model_tokens", rec["step_tokens"])[s.warmup:]  # dpo.py: each prompt once, shared
    if any(t is None for t in step_tokens + step_responses + model_tokens):
        raise SystemExit(f"{name}: a step without its token count")
    flops = useful_flops(info, sum(model_tokens), sum(step_responses), run_spec(name)["live_reference"])
    return {
        "run": name,
        "pairs_s": n * s.batch_size / epoch_s,
        "tokens_s": sum(info["tokens_per_pair"]) / epoch_s,
        "step_pairs_s": s.steps * s.batch_size / timed_s,
        "step_tokens_s": sum(step_tokens) / timed_s,
        "mfu": flops / timed_s / peak_flops,
        "precompute_s": rec["precompute_s"],
        "epoch_s": epoch_s,
        "loss_mean": sum(rec["step_loss"]) / len(rec["step_loss"]),
        "loss_last": rec["step_loss"][-1],
        **mem,
    }


def markdown_table(rows: list[dict], best_trl: dict, cuda: bool) -> str:
    mem_key = "peak_cuda_gib" if cuda else "peak_rss_gib"
    head = ["run", "compute", "pairs/s", "tokens/s", "ref log-probs s", "pairs/s, timed steps",
            "tokens/s, timed steps", "MFU, timed steps", "matmul peak around the run, GFLOP/s",
            "MFU against it", "peak RSS GiB", "ru_maxrss GiB"]
    head += ["peak CUDA GiB"] if cuda else []
    head += ["loss, mean", "loss, last step", "pairs/s / best TRL", f"peak {'CUDA' if cuda else 'RSS'} / best TRL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["compute"], f"{r['pairs_s']:.2f}", f"{r['tokens_s']:.0f}", f"{r['precompute_s']:.1f}",
                 f"{r['step_pairs_s']:.2f}", f"{r['step_tokens_s']:.0f}", f"{100 * r['mfu']:.1f}%",
                 f"{r['peak_around_gflops']:.0f}", f"{100 * r['mfu_around']:.1f}%",
                 f"{r['peak_rss_gib']:.2f}", f"{r['ru_maxrss_gib']:.2f}"]
        cells += [f"{r['peak_cuda_gib']:.2f}"] if cuda else []
        cells += [f"{r['loss_mean']:.5f}", f"{r['loss_last']:.5f}", f"{r['pairs_s'] / best_trl['pairs_s']:.2f}",
                  f"{r[mem_key] / best_trl[mem_key]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trl_command(s: BenchSettings, work: Path, spec: dict) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--runner", "trl", "--work_dir", str(work),
           "--size", s.size, "--device", s.device, "--steps", str(s.steps), "--warmup", str(s.warmup),
           "--batch_size", str(s.batch_size), "--max_length", str(s.max_length), "--lr", str(s.lr),
           "--beta", str(s.beta), "--seed", str(s.seed), "--threads", str(s.threads),
           "--activation_checkpointing", str(s.activation_checkpointing).lower()]
    return cmd + ["--precompute"] * spec["precompute"] + ["--bf16"] * (spec["compute"] == "bfloat16")


def main(s: BenchSettings) -> None:
    if s.runner == "trl":
        return run_trl(s)
    from brevity.models import compute_dtype

    for name, least in (("steps", 1), ("warmup", 0), ("batch_size", 1), ("threads", 1), ("nproc", 1)):
        if getattr(s, name) < least:
            raise SystemExit(f"--{name} {getattr(s, name)}: need >= {least}")
    specs = {name: run_spec(name) for name in s.runs.split(",")}
    work = rebuild_work_dir(s.work_dir, "bench/dpo_vs_trl.py")
    s = dataclasses.replace(s, work_dir=str(work))
    info = prepare(s, work)
    lens = sorted(info["seq_lens"])
    print(f"model: {s.size} Llama, {info['params']:,} parameters ({info['body_params']:,} in the decoder layers "
          f"and final norm, {info['head_params']:,} in the LM head); {info['pairs']} pairs, sequence length "
          f"median {lens[len(lens) // 2]}, p90 {lens[int(0.9 * len(lens))]}, max {lens[-1]} (cap {s.max_length}); "
          f"{s.warmup} warm-up + {s.steps} timed steps of {s.batch_size} pairs; {s.threads} threads", flush=True)
    cuda = s.device == "cuda"
    env = child_env(s)
    runs, peaks = [], [measure_peaks(s)]  # peaks[i], peaks[i + 1]: the machine just before and after run i
    for name, spec in specs.items():
        print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks[-1].items()), flush=True)
        out = work / name
        cmd = (trl_command(s, work, spec) if spec["trl"] else
               dpo_command(s, work, out, spec["compute"], spec["compile"], spec["shared_prompt"]))
        out.mkdir(parents=True, exist_ok=True)
        print(f"running {name}: {' '.join(cmd)}", flush=True)
        mem = run_measured(cmd, env, out.parent / f"{name}.log", cuda)
        rec = (json.loads((out / "bench_record.json").read_text()) if spec["trl"] else
               read_dpo_metrics(out, s.batch_size))
        runs.append((name, spec, rec, mem))
        peaks.append(measure_peaks(s))
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks[-1].items()))
    best = {k: max(p[k] for p in peaks) for k in peaks[0]}
    rows = []
    for i, (name, spec, rec, mem) in enumerate(runs):
        dtype = str(compute_dtype(spec["compute"], s.device)).removeprefix("torch.")
        devices = s.nproc if cuda and not spec["trl"] else 1
        around = max(peaks[i][dtype], peaks[i + 1][dtype])
        row = {**summarize(name, rec, info, s, mem, s.peak_tflops * 1e12 * devices if cuda else best[dtype]),
               "compute": dtype, "peak_around_gflops": around / 1e9}
        row["mfu_around"] = row["mfu"] * best[dtype] / around if not cuda else row["mfu"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    trl_rows = [r for r in rows if specs[r["run"]]["trl"]]
    best_trl = max(trl_rows, key=lambda r: r["pairs_s"]) if trl_rows else rows[0]
    print()
    print("MFU against " + (f"--peak_tflops {s.peak_tflops} per device" if cuda else
                            ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in best.items()) +
                            " (the best measured in this invocation); 'around the run': against the better of the "
                            "peaks measured just before and just after it"))
    print(markdown_table(rows, best_trl, cuda))
    ours = next((r for r in rows if r["run"] == "ours"), None)
    if ours and trl_rows:
        mem_key = "peak_cuda_gib" if cuda else "peak_rss_gib"
        print(f"\nfastest TRL run: {best_trl['run']}")
        print(f"speedup={ours['pairs_s'] / best_trl['pairs_s']:.2f} "
              f"memory_ratio={ours[mem_key] / best_trl[mem_key]:.2f} mfu={ours['mfu']:.2f}")


if __name__ == "__main__":
    run_main(main, (BenchSettings,))
