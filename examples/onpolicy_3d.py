"""The 3D-properties paper's on-policy finding (PAPERS.md section 3) on the embedded default's tiny Llama:
DPO on four pair sets that differ only in where chosen and rejected come from.

    python examples/onpolicy_3d.py      # needs runs/sft and data/embedded (bash run_iterative.sh)

For each training prompt there are two sources of answers: the policy (4 samples of the SFT model,
`sample.py`) and another model, the task's demonstrator (4 answers of `embedded.demonstration`, the
distribution the SFT data came from). Each source's best and worst by the proxy reward (`label.py`) give
    1 on-policy:  chosen from the policy,  rejected from the policy
    2             chosen from the dataset, rejected from the policy
    3             chosen from the policy,  rejected from the dataset
    4 off-policy: chosen from the dataset, rejected from the dataset
on the same prompts: those where all four pairs are strictly ordered by the proxy. DPO (`dpo.py`,
configs/dpo.yaml, reference = SFT) trains on each; the table gives the mean change of the training
pairs' log-probs from the SFT model to the trained one, chosen and rejected (`pair_logps`), and the
trained policy's gold score, length and KL on the held-out prompts (`evaluate.py`); the figure,
runs/onpolicy_3d/rewards.png, the batch means of both implicit rewards, beta x log(pi / pi_SFT), over
the training steps (dpo.py's metrics.jsonl): how far each side's log-probs have moved from the SFT
model's on the pairs of that step, so the batches' own lengths drop out. The stages run in this process
with the argv a command line would give them (printed).
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stages sit one level up

import dpo  # noqa: E402
import embedded  # noqa: E402
import evaluate  # noqa: E402
import label  # noqa: E402
import sample  # noqa: E402
from brevity.config import UserError, run_main, setting  # noqa: E402
from brevity.files import atomic_write_text, read_jsonl, write_jsonl  # noqa: E402

SCENARIOS = {"1 on-policy": ("policy", "policy"), "2 chosen from dataset": ("dataset", "policy"),
             "3 rejected from dataset": ("policy", "dataset"), "4 off-policy": ("dataset", "dataset")}


@dataclasses.dataclass
class Settings:
    sft_model: str = setting("runs/sft", "the policy to start from and the reference")
    data_dir: str = setting("data/embedded", "the embedded default's data (prompts.jsonl, eval.jsonl)")
    out_dir: str = setting("runs/onpolicy_3d", "samples, pairs, one model and evaluation per scenario, table")
    n: int = setting(4, "answers per prompt from each source")
    epochs: int = setting(2, "DPO epochs on each scenario (the loop's)")
    lr: float = setting(1e-4, "DPO learning rate (the loop's)")
    seed: int = setting(0, "sampling, demonstrator and training seed")
    max_new_tokens: int = setting(32, "response tokens at most (the loop's)")


def demonstrator_samples(prompts: list[str], n: int, seed: int, tokenizer) -> list[dict]:
    """sample.py's row format, {"prompt", "responses": [{"text", "num_tokens", "finish_reason"}]}, with
    n demonstrator answers per prompt (num_tokens under `tokenizer`, EOS included)."""
    rng = random.Random(f"{seed}:onpolicy-demonstrator")
    rows = []
    for prompt in prompts:
        texts = [embedded.demonstration(rng, prompt) for _ in range(n)]
        lengths = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        rows.append({"prompt": prompt, "responses": [{"text": t, "num_tokens": k, "finish_reason": "eos"}
                                                     for t, k in zip(texts, lengths)]})
    return rows


def build_scenarios(policy_pairs: list[dict], dataset_pairs: list[dict]) -> dict[str, list[dict]]:
    """The four pair sets of SCENARIOS from label.py's pairs of each source (best = chosen, worst =
    rejected, with their scores), on the prompts that both sources have and where every set's chosen
    scores strictly above its rejected; each row keeps label.py's fields for its two responses."""
    sources = {"policy": {p["prompt"]: p for p in policy_pairs}, "dataset": {p["prompt"]: p for p in dataset_pairs}}

    def pair(prompt, chosen_from, rejected_from):
        w, l = sources[chosen_from][prompt], sources[rejected_from][prompt]
        return {"prompt": prompt, "chosen": w["chosen"], "rejected": l["rejected"],
                "chosen_score": w["chosen_score"], "rejected_score": l["rejected_score"],
                "chosen_length": w["chosen_length"], "rejected_length": l["rejected_length"],
                "chosen_from": chosen_from, "rejected_from": rejected_from}

    prompts = [p for p in sources["policy"] if p in sources["dataset"]]
    built = {name: [pair(p, *where) for p in prompts] for name, where in SCENARIOS.items()}
    keep = [all(rows[i]["chosen_score"] > rows[i]["rejected_score"] for rows in built.values())
            for i in range(len(prompts))]
    return {name: [row for row, k in zip(rows, keep) if k] for name, rows in built.items()}


def pair_logps(model_dir: str, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """(log pi(chosen), log pi(rejected)) of every pair under the model in `model_dir`."""
    from brevity.logprobs import SequenceLogps, response_logps
    from brevity.models import load_model, load_tokenizer, release_memory
    from brevity.tokens import encode_prompts, encode_responses

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    prompt_ids = encode_prompts(tokenizer, [p["prompt"] for p in pairs])
    out = []
    for side in ("chosen", "rejected"):
        response_ids = encode_responses(tokenizer, [p[side] for p in pairs])
        out.append(response_logps(SequenceLogps(model), list(zip(prompt_ids, response_ids)), 64,
                                  tokenizer.pad_token_id).tolist())
    del model
    release_memory()
    return out[0], out[1]


def run_stage(script: str, main, settings_classes, argv: list[str]):
    print("+ python " + " ".join([script, *argv]), flush=True)
    return run_main(main, settings_classes, argv=argv)


def slug(name: str) -> str:
    return name.replace(" ", "_")


def main(s: Settings) -> list[dict]:
    """Build the four pair sets, train DPO on each, measure; write table.md, table.json and rewards.png."""
    from brevity.models import load_tokenizer

    data, out = Path(s.data_dir), Path(s.out_dir)
    for needed in (data / "prompts.jsonl", data / "eval.jsonl", Path(s.sft_model)):
        if not needed.exists():
            raise UserError(f"{needed}: not found; run `bash run_iterative.sh` first (it makes data and SFT)")
    prompts = [r["prompt"] for r in read_jsonl(data / "prompts.jsonl", required={"prompt": str})]
    run_stage("sample.py", sample.main, (sample.Settings,), [
        "--model", s.sft_model, "--prompts", str(data / "prompts.jsonl"), "--output", str(out / "policy" / "samples.jsonl"),
        "--n", str(s.n), "--max_new_tokens", str(s.max_new_tokens), "--seed", str(s.seed)])
    write_jsonl(out / "dataset" / "samples.jsonl",
                demonstrator_samples(prompts, s.n, s.seed, load_tokenizer(s.sft_model)))
    for source in ("policy", "dataset"):
        run_stage("label.py", label.main, (label.Settings,), [
            "--samples", str(out / source / "samples.jsonl"), "--reward_fn", "embedded:proxy_reward"])
    scenarios = build_scenarios(read_jsonl(out / "policy" / "pairs.jsonl"), read_jsonl(out / "dataset" / "pairs.jsonl"))

    results = []
    sft_generations = out / "sft_generations.jsonl"
    for name, pairs in scenarios.items():
        folder = out / slug(name)
        write_jsonl(folder / "pairs.jsonl", pairs)
        run_stage("dpo.py", dpo.main, dpo.settings_classes, [
            "--config", str(ROOT / "configs" / "dpo.yaml"), "--model", s.sft_model, "--data", str(folder / "pairs.jsonl"),
            "--output_dir", str(folder / "model"), "--loss", "dpo", "--epochs", str(s.epochs), "--lr", str(s.lr),
            "--seed", str(s.seed), "--resume"])
        result = run_stage("evaluate.py", evaluate.main, (evaluate.Settings,), [
            "--model", str(folder / "model"), "--sft_model", s.sft_model, "--prompts", str(data / "eval.jsonl"),
            "--output_dir", str(folder / "eval"), "--sft_generations", str(sft_generations),
            "--max_new_tokens", str(s.max_new_tokens), "--gold_fn", "embedded:gold_score"])
        before, after = pair_logps(s.sft_model, pairs), pair_logps(str(folder / "model"), pairs)
        n = len(pairs)
        results.append({"scenario": name, "pairs": n,
                        "logp_chosen_sft": sum(before[0]) / n, "logp_rejected_sft": sum(before[1]) / n,
                        "delta_logp_chosen": sum(a - b for a, b in zip(after[0], before[0])) / n,
                        "delta_logp_rejected": sum(a - b for a, b in zip(after[1], before[1])) / n,
                        **{k: result[k] for k in ("gold_score", "gold_score_stderr", "gold_score_sft", "length",
                                                  "length_sft", "kl_vs_sft")}})

    lines = ["| scenario | pairs | logp chosen (SFT) | Δ logp chosen | logp rejected (SFT) | Δ logp rejected | "
             "gold | ± | length | KL |", "|---" * 10 + "|"]
    for r in results:
        lines.append(f"| {r['scenario']} | {r['pairs']} | {r['logp_chosen_sft']:.2f} | {r['delta_logp_chosen']:+.2f} | "
                     f"{r['logp_rejected_sft']:.2f} | {r['delta_logp_rejected']:+.2f} | {r['gold_score']:.3f} | "
                     f"{r['gold_score_stderr']:.3f} | {r['length']:.2f} | {r['kl_vs_sft']:.2f} |")
    text = "\n".join(lines) + f"\n\nSFT: gold {results[0]['gold_score_sft']:.3f}, length {results[0]['length_sft']:.2f}\n"
    atomic_write_text(out / "table.md", text)
    atomic_write_text(out / "table.json", json.dumps(results, indent=1) + "\n")
    print(text, end="")

    from brevity import plots

    panels, curves = ("rewards/chosen", "rewards/rejected"), {}
    for name in scenarios:
        log = read_jsonl(out / slug(name) / "model" / "metrics.jsonl")
        curves[name] = {k: [row[k] for row in log if k in row] for k in panels}
    plots.plot_curves(curves, panels, out / "rewards.png")
    print(f"wrote {out / 'rewards.png'}")
    return results


if __name__ == "__main__":
    run_main(main, (Settings,))
