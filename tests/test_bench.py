"""The benchmark harnesses' own logic (bench/): their data and their arithmetic. No timing, no TRL."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import dpo_vs_trl  # noqa: E402


def test_synthetic_pairs_fit_max_length_and_are_long_tailed():
    """Real preference data: most pairs far below the cap (the median under half of it), a few near it
    (between 1% and 10% of the sequences within 10% of it, a long tail: the 99th percentile over twice the
    median), none over it. A sequence is prompt + response + EOS, one word per token."""
    rows = dpo_vs_trl.make_pairs(400, vocab_size=8000, max_length=256, seed=0)
    lengths = sorted(len(r["prompt"].split()) + len(r[k].split()) + 1 for r in rows for k in ("chosen", "rejected"))
    median, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    near_cap = sum(n > 0.9 * 256 for n in lengths)
    assert lengths[-1] <= 256
    assert median < 256 // 2
    assert 0.01 * len(lengths) < near_cap < 0.1 * len(lengths)
    assert p99 > 2 * median


def test_pair_tokens_is_what_the_tokenizer_produces():
    """tokens/s counts prompt + response + EOS for chosen and rejected, as dpo.py and TRL see them."""
    tokenizer = dpo_vs_trl.build_tokenizer(100)
    row = dpo_vs_trl.make_pairs(1, vocab_size=100, max_length=64, seed=1)[0]
    count = sum(len(tokenizer(row["prompt"] + row[k] + "</s>", add_special_tokens=False)["input_ids"])
                for k in ("chosen", "rejected"))
    assert dpo_vs_trl.pair_tokens(row) == count


def test_summarize_counts_the_reference_pass_in_the_epoch_not_in_the_timed_steps():
    """3 steps of 2 pairs ending at 11, 12, 14 s after a start at 10 s, 4 s of reference log-probs:
    epoch = 4 + (14 - 10) = 8 s for 6 pairs (0.75/s) and 6 x 10 tokens (7.5/s); timed steps (after
    1 warm-up) = 14 - 11 = 3 s for 4 pairs (1.33/s) and 30 + 40 tokens (23.3/s); the loss's mean
    and last step; the memory figures pass through."""
    s = dpo_vs_trl.BenchSettings(steps=2, warmup=1, batch_size=2)
    record = {"step_end": [11.0, 12.0, 14.0], "step_tokens": [20, 30, 40], "step_response_tokens": [5, 6, 7],
              "step_loss": [0.7, 0.6, 0.5], "train_start": 10.0, "precompute_s": 4.0}
    info = {"body_params": 1, "head_params": 1, "tokens_per_pair": [10] * 6}
    row = dpo_vs_trl.summarize("ours", record, info, s, {"peak_rss_gib": 1.0}, peak_flops=1.0)
    assert abs(row["pairs_s"] - 6 / 8) < 1e-9
    assert abs(row["tokens_s"] - 60 / 8) < 1e-9
    assert abs(row["step_pairs_s"] - 4 / 3) < 1e-9
    assert abs(row["step_tokens_s"] - 70 / 3) < 1e-9
    assert abs(row["loss_mean"] - 0.6) < 1e-9 and row["loss_last"] == 0.5
    assert row["peak_rss_gib"] == 1.0


def test_summarize_refuses_a_record_with_a_step_time_missing():
    s = dpo_vs_trl.BenchSettings(steps=2, warmup=1, batch_size=2)
    record = {"step_end": [11.0, 12.0], "step_tokens": [20, 30], "step_response_tokens": [5, 6],
              "step_loss": [0.7, 0.6], "train_start": 10.0, "precompute_s": 4.0}
    info = {"body_params": 1, "head_params": 1, "tokens_per_pair": [10] * 6}
    with pytest.raises(SystemExit, match="ours: expected 3 step times, got 2"):
        dpo_vs_trl.summarize("ours", record, info, s, {}, peak_flops=1.0)


def test_mfu_counts_the_head_on_response_tokens_and_a_live_reference_forward():
    """Timed steps: 70 tokens, 13 of them response tokens, in 3 s; 100 body and 10 head parameters:
    6 x (100 x 70 + 10 x 13) = 42,780 FLOPs of training; a live reference forward adds 2 x the same
    (57,040). Against a 10,000 FLOP/s peak: 1.426 and 1.901."""
    s = dpo_vs_trl.BenchSettings(steps=2, warmup=1, batch_size=2)
    record = {"step_end": [11.0, 12.0, 14.0], "step_tokens": [20, 30, 40], "step_response_tokens": [5, 6, 7],
              "step_loss": [0.7, 0.6, 0.5], "train_start": 10.0, "precompute_s": 0.0}
    info = {"body_params": 100, "head_params": 10, "tokens_per_pair": [10] * 6}
    for name, flops in (("ours", 42_780), ("trl_precompute_bf16", 42_780), ("trl", 57_040), ("trl_bf16", 57_040)):
        row = dpo_vs_trl.summarize(name, record, info, s, {}, peak_flops=10_000)
        assert abs(row["mfu"] - flops / 3 / 10_000) < 1e-9, name


def test_mfu_counts_the_tokens_the_model_computes_a_shared_prompt_once():
    """dpo.py's record gives the tokens its model computed (each prompt once) beside the sequences'
    tokens: 55 of the timed steps' 70, so 6 x (100 x 55 + 10 x 13) = 33,780 FLOPs; tokens/s stays 70 / 3."""
    s = dpo_vs_trl.BenchSettings(steps=2, warmup=1, batch_size=2)
    record = {"step_end": [11.0, 12.0, 14.0], "step_tokens": [20, 30, 40], "step_model_tokens": [15, 25, 30],
              "step_response_tokens": [5, 6, 7], "step_loss": [0.7, 0.6, 0.5], "train_start": 10.0,
              "precompute_s": 0.0}
    info = {"body_params": 100, "head_params": 10, "tokens_per_pair": [10] * 6}
    row = dpo_vs_trl.summarize("ours", record, info, s, {}, peak_flops=10_000)
    assert abs(row["mfu"] - 33_780 / 3 / 10_000) < 1e-9
    assert abs(row["step_tokens_s"] - 70 / 3) < 1e-9


def test_run_names_say_what_each_run_computes_in():
    assert dpo_vs_trl.run_spec("ours")["compute"] == "auto"
    assert dpo_vs_trl.run_spec("ours_fp32")["compute"] == "float32"
    compiled = dpo_vs_trl.run_spec("ours_compile")
    assert compiled["compute"] == "auto" and compiled["compile"] and not dpo_vs_trl.run_spec("ours")["compile"]
    s, work = dpo_vs_trl.BenchSettings(), Path("/w")
    command = dpo_vs_trl.dpo_command(s, work, work / "ours_compile", "auto", compiled["compile"])
    assert command[command.index("--torch_compile") + 1] == "true"
    two_rows = dpo_vs_trl.run_spec("ours_two_rows")
    assert dpo_vs_trl.run_spec("ours")["shared_prompt"] and not two_rows["shared_prompt"]
    command = dpo_vs_trl.dpo_command(s, work, work / "ours_two_rows", "auto", shared_prompt=two_rows["shared_prompt"])
    assert command[command.index("--shared_prompt") + 1] == "false"
    trl = dpo_vs_trl.run_spec("trl_precompute_bf16")
    assert trl["trl"] and trl["precompute"] and trl["compute"] == "bfloat16" and not trl["live_reference"]
    assert dpo_vs_trl.run_spec("trl")["live_reference"] and dpo_vs_trl.run_spec("trl")["compute"] == "float32"


@pytest.mark.parametrize("operator, kind", [
    ("aten::mm", "matrix multiplies"), ("aten::addmm", "matrix multiplies"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_log_softmax_backward_data", "log-softmax"), ("aten::_to_copy", "casts and copies"),
    ("aten::_fused_adamw_", "AdamW"), ("aten::rsqrt", "norms"), ("aten::silu_backward", "elementwise"),
    ("aten::embedding", "other"),
])
def test_the_profile_puts_each_operator_in_its_kind(operator, kind):
    import profile_dpo

    assert profile_dpo.kind_of(operator) == kind


@pytest.mark.parametrize("harness, field, value, message", [
    ("dpo_vs_trl", "steps", 0, "--steps 0: need >= 1"), ("dpo_vs_trl", "warmup", -1, "--warmup -1: need >= 0"),
    ("profile_dpo", "steps", -3, "--steps -3: need >= 1"), ("profile_dpo", "batch_size", 0, "--batch_size 0: need >= 1"),
])
def test_a_count_out_of_range_is_refused_before_the_work_dir_is_touched(harness, field, value, message, tmp_path):
    import profile_dpo

    module = {"dpo_vs_trl": dpo_vs_trl, "profile_dpo": profile_dpo}[harness]
    settings = (dpo_vs_trl.BenchSettings if harness == "dpo_vs_trl" else profile_dpo.ProfileSettings)(
        work_dir=str(tmp_path / "work"), **{field: value})
    with pytest.raises(SystemExit, match=message):
        module.main(settings)
    assert not (tmp_path / "work").exists()
