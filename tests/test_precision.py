"""Mixed precision: float32 weights, gradients and optimizer state, bfloat16 matrix multiplies
(on one process a bfloat16 copy of the model, `ComputeCopy`; autocast where a model is scored
as it is), float32 log-softmax, log-probs and losses; `--compute_dtype auto` picks bfloat16 only
where the CPU has bfloat16 instructions.

Tolerance against float32: bfloat16 keeps 8 significant bits, so each rounding is off by up to
2^-9 (0.2%) of its value. On the 4-layer, hidden-128 Llama below (the embedded default's shape),
response log-probs stay within 5e-3 nats per token of float32 (measured: 1.4e-3 on the copy,
whose activations between the layers are bfloat16; 0.9e-3 under autocast, whose are float32);
dpo.py's losses over 4 steps at lr 1e-3 within 2e-3. At step 0 the policy's log-probs equal the
cached reference's (both bfloat16, right-padded batches), so the DPO loss is still log 2.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer, pref_rows, save_model_dir, write_jsonl
from safetensors import safe_open

import dpo
from brevity import models
from brevity.dist import Dist
from brevity.fsdp import wrap_policy
from brevity.logprobs import SequenceLogps
from brevity.tokens import collate

SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, head_dim=32)


@pytest.fixture(scope="module")
def shaped_model_dir(tmp_path_factory, tiny_tokenizer):
    return save_model_dir(tmp_path_factory.mktemp("shaped") / "model", tiny_tokenizer, **SHAPE)


def batch_of_pairs(tokenizer, n=16):
    pairs, _ = dpo.encode_pairs(pref_rows(n), tokenizer, dpo.Settings())
    return collate([(p, c) for p, c, _ in pairs], tokenizer.pad_token_id)


@pytest.fixture
def fresh_compute_dtype():
    models.compute_dtype.cache_clear()
    yield models.compute_dtype
    models.compute_dtype.cache_clear()


def test_auto_computes_in_bfloat16_only_on_a_cpu_with_bfloat16_instructions(fresh_compute_dtype, monkeypatch, capsys):
    monkeypatch.setattr(models, "cpu_bfloat16_support", lambda: "avx512_bf16")
    assert fresh_compute_dtype("auto", "cpu") == torch.bfloat16 and capsys.readouterr().out == ""
    fresh_compute_dtype.cache_clear()
    monkeypatch.setattr(models, "cpu_bfloat16_support", lambda: "")
    assert fresh_compute_dtype("auto", "cpu") == torch.float32
    assert fresh_compute_dtype("auto", "cpu") == torch.float32
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "no bfloat16 instructions" in said[0]  # once per process
    assert fresh_compute_dtype("bfloat16", "cpu") == torch.bfloat16  # forced either way
    assert fresh_compute_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_bfloat16_support", lambda: "avx512_bf16")
    assert fresh_compute_dtype("float32", "cpu") == torch.float32


def test_inference_weights_are_the_compute_dtype_unless_named():
    cpu = torch.device("cpu")
    assert models.inference_dtype("auto", cpu, "bfloat16") == torch.bfloat16
    assert models.inference_dtype("auto", cpu, "float32") == torch.float32
    assert models.inference_dtype("float32", cpu, "bfloat16") == torch.float32  # then autocast computes in bf16
    assert models.autocast_dtype(torch.float32, torch.bfloat16) == torch.bfloat16
    assert models.autocast_dtype(torch.bfloat16, torch.bfloat16) is None
    assert models.autocast_dtype(torch.float32, torch.float32) is None


def test_log_softmax_of_the_chunked_log_probs_runs_in_float32_under_cpu_autocast(tiny_tokenizer):
    """CPU autocast leaves logsumexp of bfloat16 logits in bfloat16 (off by ~1e-2 here); ours takes the
    bfloat16-computed logits to float32 first, so it equals a float32 log-softmax of those logits."""
    model = make_model(tiny_tokenizer, **SHAPE)
    input_ids, attention_mask, response_mask = batch_of_pairs(tiny_tokenizer)
    with torch.no_grad():
        ours = SequenceLogps(model, autocast_dtype=torch.bfloat16)(input_ids, attention_mask, response_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        assert logits.dtype == torch.bfloat16

        def summed(logps):
            token = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()
            return (token * response_mask[:, 1:]).sum(-1)

        float32_softmax, bfloat16_softmax = summed(logits.float().log_softmax(-1)), summed(logits.log_softmax(-1))
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, float32_softmax, atol=1e-4, rtol=0)
    assert (bfloat16_softmax - float32_softmax).abs().max() > 1e-3  # the check above would see a bf16 softmax


def test_bfloat16_log_probs_are_within_tolerance_of_float32(tiny_tokenizer):
    model = make_model(tiny_tokenizer, **SHAPE)
    input_ids, attention_mask, response_mask = batch_of_pairs(tiny_tokenizer)
    with torch.no_grad():
        full = SequenceLogps(model)(input_ids, attention_mask, response_mask)
        mixed = SequenceLogps(model, autocast_dtype=torch.bfloat16)(input_ids, attention_mask, response_mask)
    per_token = (mixed - full).abs() / response_mask.sum(-1)
    assert 0 < per_token.max() < 5e-3, per_token.max()


def test_bfloat16_compute_keeps_float32_parameters_gradients_and_optimizer_state(tiny_tokenizer):
    policy = wrap_policy(make_model(tiny_tokenizer, **SHAPE), Dist(), compute_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    logps = policy(*batch_of_pairs(tiny_tokenizer))
    assert logps.dtype == torch.float32
    (-logps.mean()).backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in policy.parameters())
    assert all(v.dtype == torch.float32 for state in optimizer.state.values() for k, v in state.items()
               if k != "step")


def lowered(model, dtype=torch.bfloat16):
    """`model` with its parameters (not its buffers) in `dtype`: what `ComputeCopy` should run."""
    out = copy.deepcopy(model)
    for param in out.parameters():
        param.data = param.data.to(dtype)
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_one_process_computes_on_a_bfloat16_copy_and_its_gradients_land_in_the_float32_weights(tiny_tokenizer, tied):
    model = make_model(tiny_tokenizer, tie_word_embeddings=tied, **SHAPE)
    twin = lowered(model)
    policy = wrap_policy(model, Dist(), compute_dtype=torch.bfloat16)
    batch = batch_of_pairs(tiny_tokenizer)
    expected = SequenceLogps(twin)(*batch)
    for _ in range(2):  # two micro-steps: the master gradient is their float32 sum
        logps = policy(*batch)
        assert torch.equal(logps, expected)
        (-logps.mean()).backward()
    (-expected.mean()).backward()
    for master, param in zip(model.parameters(), twin.parameters(), strict=True):
        assert master.dtype == master.grad.dtype == torch.float32
        assert torch.equal(master.grad, 2 * param.grad.float())


def test_the_bfloat16_copy_follows_the_float32_weights_after_a_fused_adamw_step(tiny_tokenizer):
    """A fused AdamW step writes the weights without moving their version counters: every forward
    casts the master weights afresh, so the step after it computes with the updated ones."""
    model = make_model(tiny_tokenizer, **SHAPE)
    policy = wrap_policy(model, Dist(), compute_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, fused=True)
    batch = batch_of_pairs(tiny_tokenizer)
    before = policy(*batch)
    (-before.mean()).backward()
    optimizer.step()
    with torch.no_grad():
        after = policy(*batch)
        assert torch.equal(after, SequenceLogps(lowered(model))(*batch))
    assert (after - before).abs().max() > 0.1


def test_the_bfloat16_copy_stays_within_tolerance_of_float32(tiny_tokenizer):
    model = make_model(tiny_tokenizer, **SHAPE)
    batch = batch_of_pairs(tiny_tokenizer)
    with torch.no_grad():
        full = SequenceLogps(model)(*batch)
        mixed = wrap_policy(model, Dist(), compute_dtype=torch.bfloat16)(*batch)
    per_token = (mixed - full).abs() / batch[2].sum(-1)
    assert 0 < per_token.max() < 5e-3, per_token.max()


def dpo_run(model_dir, data, out, compute_dtype, **overrides):
    settings = dict(model=str(model_dir), data=str(data), output_dir=str(out), loss="dpo", batch_size=8, max_steps=4,
                    lr=1e-3, warmup_steps=0, save_every=0, compute_dtype=compute_dtype)
    dpo.main(dpo.Settings(**{**settings, **overrides}), dpo.loss_settings("dpo")())
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bfloat16_dpo_losses_match_float32_and_the_saved_model_is_float32(shaped_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", pref_rows(32))
    full = dpo_run(shaped_model_dir, data, tmp_path / "fp32", "float32")
    mixed = dpo_run(shaped_model_dir, data, tmp_path / "bf16", "bfloat16")
    # Step 0: the reference is the policy, computed in bfloat16 too, but in the reference pass's batches, whose
    # padded widths differ from the step's; a bfloat16 log-prob moves with its batch's width by ~1e-5 relative.
    assert abs(mixed[0]["loss"] - math.log(2)) < 1e-4 and abs(mixed[0]["rewards/margin"]) < 1e-3
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(full, mixed)) < 2e-3
    assert any(a["loss"] != b["loss"] for a, b in zip(full, mixed))  # it did compute in bfloat16
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())


@pytest.mark.slow
def test_compiled_layers_train_as_the_eager_ones_and_save_the_same_weights_names(shaped_model_dir, tmp_path):
    """--torch_compile: the same losses as eager within float32 reordering (inductor fuses and reorders
    the layers' elementwise work), and a saved model with the eager one's keys (compiled in place)."""
    from torch._dynamo.utils import counters

    data = write_jsonl(tmp_path / "prefs.jsonl", pref_rows(32))
    eager = dpo_run(shaped_model_dir, data, tmp_path / "eager", "float32")
    counters.clear()
    compiled = dpo_run(shaped_model_dir, data, tmp_path / "compiled", "float32", torch_compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not counters["graph_break"], dict(counters["graph_break"])  # the whole layer, attention included
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(eager, compiled)) < 1e-4
    with safe_open(str(tmp_path / "eager" / "model.safetensors"), framework="pt") as a, \
            safe_open(str(tmp_path / "compiled" / "model.safetensors"), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())


def test_compiled_layers_without_a_cpu_compiler_are_refused_before_any_step(shaped_model_dir, tmp_path,
                                                                            monkeypatch):
    from brevity.config import UserError

    data = write_jsonl(tmp_path / "prefs.jsonl", pref_rows(32))
    monkeypatch.setenv("CXX", "no-such-c++")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ either
    with pytest.raises(UserError, match=r"needs a C\+\+ compiler, and none of no-such-c\+\+, g\+\+ is on PATH"):
        dpo_run(shaped_model_dir, data, tmp_path / "out", "float32", torch_compile=True)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_bfloat16_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    model_dir = save_model_dir(tmp_path / "model", tokenizer)
    data = write_jsonl(tmp_path / "prefs.jsonl", pref_rows(32))
    whole = dpo_run(model_dir, data, tmp_path / "whole", "bfloat16", save_every=2)
    real, calls = dpo.accumulate_gradients, []

    def dies_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo, "accumulate_gradients", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        dpo_run(model_dir, data, tmp_path / "resumed", "bfloat16", save_every=2)
    monkeypatch.setattr(dpo, "accumulate_gradients", real)
    resumed = dpo_run(model_dir, data, tmp_path / "resumed", "bfloat16", save_every=2, resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    with safe_open(str(tmp_path / "whole" / "model.safetensors"), framework="pt") as a, \
            safe_open(str(tmp_path / "resumed" / "model.safetensors"), framework="pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
