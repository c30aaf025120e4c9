"""dpo.py with the options of losses.Objective on a tiny Llama: each trains; the trainer gives the losses
what `needs` asks (the first step's loss equals objective_losses on log-probs worked out with a plain
full log-softmax); a mixture logs its parts; the per-token reference cache is keyed apart from the sums;
TR-DPO's live reference moves as TRL's does, and resumes from its checkpoint; bad combinations are one-line
errors before anything is written."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tokenizer, save_model_dir
from safetensors.torch import load_file

import dpo
from brevity.batches import global_batches
from brevity.config import parse_settings, run_main
from brevity.generation import response_seed
from brevity.models import load_model
from losses import objective_losses

TRAIN = ["--batch_size", "8", "--lr", "1e-3", "--warmup_steps", "0", "--lr_schedule", "constant", "--save_every", "0",
         "--activation_checkpointing", "false", "--compute_dtype", "float32"]  # exact values; bfloat16: test_precision.py


def train(model_dir, data, out, *flags, steps: int = 2):
    argv = ["--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--max_steps", str(steps),
            *TRAIN, *flags]
    return run_main(dpo.main, dpo.settings_classes, argv)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags", [
    ["--loss", "dpo", "--ld_alpha", "0.5"],
    ["--loss", "ipo", "--sampo"],
    ["--loss", "simpo", "--sampo"],
    ["--loss", "bco_pair", "--use_weighting"],
    ["--loss", "robust", "--f_divergence", "js_divergence"],
    ["--loss", "sigmoid+bco_pair+sft", "--loss_weights", "0.8,0.2,1.0"],
    ["--loss", "dpo", "--sync_ref_model", "--ref_model_sync_steps", "1"],
], ids=["ld_alpha", "sampo", "sampo-reference-free", "wpo", "f-divergence", "mixture", "tr-dpo"])
def test_every_option_trains(flags, tiny_model_dir, tiny_prefs_jsonl, tmp_path):
    out = tmp_path / "out"
    trained = train(tiny_model_dir, tiny_prefs_jsonl, out, *flags)
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        assert not torch.equal(load_model(str(tiny_model_dir))(input_ids=ids).logits, trained(input_ids=ids).logits)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    if "--sync_ref_model" in flags:
        assert not (out / dpo.REF_CACHE).exists()  # the live reference needs no cache


def test_a_mixture_logs_each_part_and_the_loss_is_their_weighted_sum(tiny_model_dir, tiny_prefs_jsonl, tmp_path):
    out = tmp_path / "out"
    train(tiny_model_dir, tiny_prefs_jsonl, out, "--loss", "sigmoid+bco_pair+sft", "--loss_weights", "0.8,0.2,1.0",
          "--beta", "0.3")
    for row in metrics(out):
        parts = 0.8 * row["loss/sigmoid"] + 0.2 * row["loss/bco_pair"] + 1.0 * row["loss/sft"]
        assert row["loss"] == pytest.approx(parts, rel=1e-6)
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["loss"], settings["loss_weights"], settings["beta"]) == ("sigmoid+bco_pair+sft", "0.8,0.2,1.0", 0.3)


def manual_token_logps(model, prompt: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token: log pi(y_t | x, y_<t) and log sum_v pi(v | x, y_<t)^2, by a full float32 log-softmax."""
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logps[positions, torch.tensor(response)], torch.logsumexp(2 * logps[positions], -1)


def padded(rows: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows))
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@pytest.mark.parametrize("flags", [["--ld_alpha", "0.5"], ["--sampo"], ["--use_weighting"],
                                   ["--f_divergence", "alpha_divergence"]],
                         ids=["ld_alpha", "sampo", "wpo", "alpha-divergence"])
def test_the_first_step_loss_is_the_objective_on_the_models_own_log_probs(flags, tiny_tokenizer, tiny_prefs_jsonl,
                                                                         tmp_path):
    """A reference unlike the policy (another seed), so that the value is not log 2. The step's pairs, their
    per-token log-probs under both models, log sum p^2 and SamPO's seeds (seed, pair, step 0) are rebuilt
    here; objective_losses on them gives the logged loss (the mean over the batch's 8 pairs) to 1e-5."""
    policy_dir = save_model_dir(tmp_path / "policy", tiny_tokenizer, seed=0)
    ref_dir = save_model_dir(tmp_path / "ref", tiny_tokenizer, seed=1)
    out = tmp_path / "out"
    train(policy_dir, tiny_prefs_jsonl, out, "--loss", "dpo", "--beta", "0.5", "--ref_model", str(ref_dir), *flags,
          steps=1)
    argv = ["--loss", "dpo", "--beta", "0.5", *flags]
    s, hyper = parse_settings(dpo.settings_classes(argv), argv)
    pairs, _ = dpo.encode_pairs([json.loads(x) for x in tiny_prefs_jsonl.read_text().splitlines()], tiny_tokenizer, s)
    _, batch = next(global_batches(dpo.row_lengths(pairs, s.shared_prompt), 8, s.seed, s.bucket_batches, 0, 1))
    policy, reference = load_model(str(policy_dir)), load_model(str(ref_dir))
    tensors = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        mine = [manual_token_logps(policy, pairs[i][0], pairs[i][k]) for i in batch]
        tensors[f"policy_{side}_logps"] = padded([m[0] for m in mine])
        tensors[f"policy_{side}_log_sum_sq_probs"] = padded([m[1] for m in mine])
        tensors[f"reference_{side}_logps"] = padded([manual_token_logps(reference, pairs[i][0], pairs[i][k])[0]
                                                     for i in batch])
        tensors[f"{side}_lengths"] = torch.tensor([len(pairs[i][k]) for i in batch])
    tensors["pair_seeds"] = torch.tensor([response_seed(s.seed, i, 0) for i in batch])
    expected = objective_losses(dpo.build_objective(s, hyper), **tensors).losses.mean().item()
    assert abs(metrics(out)[0]["loss"] - expected) < 1e-5
    assert abs(expected - math.log(2)) > 1e-3


def test_the_per_token_reference_cache_holds_every_token_under_its_own_key(tiny_model_dir, tiny_prefs_jsonl,
                                                                          tmp_path):
    """After an LD-DPO run the cache holds each response token's reference log-prob, pair after pair; the
    key of the sums (what an older cache holds) does not open it."""
    out = tmp_path / "out"
    train(tiny_model_dir, tiny_prefs_jsonl, out, "--loss", "dpo", "--ld_alpha", "0.5", steps=1)
    s, _ = parse_settings(dpo.settings_classes(["--loss", "dpo"]), ["--loss", "dpo"])
    tokenizer = make_tokenizer()
    pairs, _ = dpo.encode_pairs([json.loads(x) for x in tiny_prefs_jsonl.read_text().splitlines()], tokenizer, s)
    path, compute = out / dpo.REF_CACHE, torch.float32  # TRAIN computes in float32
    assert dpo.read_ref_cache(path, dpo.ref_cache_key(pairs, str(tiny_model_dir), s.dtype, compute)) is None
    chosen, rejected = dpo.read_ref_cache(path, dpo.ref_cache_key(pairs, str(tiny_model_dir), s.dtype, compute,
                                                                           per_token=True))
    model = load_model(str(tiny_model_dir))
    want = torch.cat([manual_token_logps(model, p, c)[0] for p, c, _ in pairs])
    assert chosen.shape == want.shape and torch.allclose(chosen, want, atol=1e-4, rtol=0)
    assert rejected.shape == (sum(len(r) for _, _, r in pairs),)


def test_tr_dpo_with_alpha_1_and_tau_1_starts_every_step_at_the_policy(tiny_model_dir, tiny_prefs_jsonl, tmp_path):
    """The reference becomes the policy after every step, so every step's DPO loss is log 2 and its margin 0;
    with the fixed reference, step 2's is not."""
    train(tiny_model_dir, tiny_prefs_jsonl, tmp_path / "tr", "--loss", "dpo", "--sync_ref_model",
          "--ref_model_mixup_alpha", "1", "--ref_model_sync_steps", "1", steps=3)
    assert all(abs(r["loss"] - math.log(2)) < 1e-6 and abs(r["rewards/margin"]) < 1e-6 for r in metrics(tmp_path / "tr"))
    train(tiny_model_dir, tiny_prefs_jsonl, tmp_path / "fixed", "--loss", "dpo", steps=3)
    assert abs(metrics(tmp_path / "fixed")[1]["loss"] - math.log(2)) > 1e-4


def test_tr_dpo_with_alpha_0_is_dpo_with_a_fixed_reference(tiny_model_dir, tiny_prefs_jsonl, tmp_path):
    train(tiny_model_dir, tiny_prefs_jsonl, tmp_path / "tr", "--loss", "dpo", "--sync_ref_model",
          "--ref_model_mixup_alpha", "0", "--ref_model_sync_steps", "1", steps=3)
    train(tiny_model_dir, tiny_prefs_jsonl, tmp_path / "fixed", "--loss", "dpo", steps=3)
    a, b = load_file(tmp_path / "tr" / "model.safetensors"), load_file(tmp_path / "fixed" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_tr_dpo_update_equals_trls_sync_callback(tiny_tokenizer):
    """TRL 1.16's SyncRefModelCallback._sync_target_model on copies of the same two models gives the same
    reference, parameter for parameter (bitwise)."""
    pytest.importorskip("trl")
    from trl.trainer.callbacks import SyncRefModelCallback

    from conftest import make_model
    ours, theirs = make_model(tiny_tokenizer, seed=1), make_model(tiny_tokenizer, seed=1)
    policy = make_model(tiny_tokenizer, seed=2)
    dpo.sync_reference(ours, policy, 0.6)
    SyncRefModelCallback._sync_target_model(policy, theirs, 0.6)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def make_the_loss_nan_at_step(monkeypatch, step: int):
    """Patch dpo.objective_losses so that its `step`-th call's losses are NaN (the run stops there, after
    the checkpoint before it); return the real function, to patch back."""
    real, calls = dpo.objective_losses, []

    def nan_at_step(objective, **tensors):
        calls.append(1)
        result = real(objective, **tensors)
        return result._replace(losses=result.losses * (math.nan if len(calls) == step else 1.0))

    monkeypatch.setattr(dpo, "objective_losses", nan_at_step)
    return real


def test_tr_dpo_resumes_with_the_reference_it_had_reached(tiny_model_dir, tiny_prefs_jsonl, tmp_path, monkeypatch,
                                                          capsys):
    """tau 2, alpha 0.5, a checkpoint every step; a NaN at step 4 stops the run after the checkpoint of step 3,
    whose reference was moved at step 2. The resumed run ends with the weights of one never stopped."""
    flags = ["--loss", "dpo", "--sync_ref_model", "--ref_model_sync_steps", "2", "--ref_model_mixup_alpha", "0.5",
             "--save_every", "1"]
    train(tiny_model_dir, tiny_prefs_jsonl, tmp_path / "never", *flags, steps=6)
    real = make_the_loss_nan_at_step(monkeypatch, 4)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        train(tiny_model_dir, tiny_prefs_jsonl, out, *flags, "--resume", steps=6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000003"]
    monkeypatch.setattr(dpo, "objective_losses", real)
    train(tiny_model_dir, tiny_prefs_jsonl, out, *flags, "--resume", steps=6)
    assert "(step 3 of 6)" in capsys.readouterr().out
    a, b = load_file(tmp_path / "never" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_tr_dpo_checkpoint_is_not_resumed_without_its_reference(tiny_model_dir, tiny_prefs_jsonl, tmp_path,
                                                                   monkeypatch, capsys):
    """A checkpoint saved with --sync_ref_model holds the reference it had reached; resuming it without
    the flag is refused in one line before anything is loaded."""
    real = make_the_loss_nan_at_step(monkeypatch, 2)
    out = tmp_path / "out"
    flags = ["--loss", "dpo", "--sync_ref_model", "--ref_model_sync_steps", "1", "--save_every", "1"]
    with pytest.raises(SystemExit):
        train(tiny_model_dir, tiny_prefs_jsonl, out, *flags, "--resume", steps=3)
    monkeypatch.setattr(dpo, "objective_losses", real)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train(tiny_model_dir, tiny_prefs_jsonl, out, "--loss", "dpo", "--save_every", "1", "--resume", steps=3)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "checkpoint-00000001: saved with a reference model that changes while training" in err


@pytest.mark.parametrize("flags, message", [
    (["--loss", "dpo+lndpo"], "the following arguments are required: --beta"),
    (["--loss", "dpo+sft", "--loss_weights", "1"], "1 weights for the 2 losses"),
    (["--loss", "dpo+sft", "--loss_weights", "1,x"], "comma-separated numbers"),
    (["--loss", "dpo+nope"], "unknown --loss 'nope'"),
    (["--loss", "nca_pair", "--f_divergence", "forward_kl"], "not to nca_pair"),
    (["--loss", "aot", "--use_weighting"], "use_weighting (WPO) weights pairs, and aot sorts them"),
    (["--loss", "dpo", "--ld_alpha", "2"], "ld_alpha must be in [0, 1]"),
    (["--loss", "dpo", "--ld_alpha", "0.5", "--sampo"], "choose one"),
    (["--loss", "dpo", "--beta", "-1"], "beta must be > 0"),
    (["--loss", "simpo", "--sync_ref_model"], "reference-free; there is no reference to sync"),
    (["--loss", "dpo", "--sync_ref_model", "--ref_model_sync_steps", "0"], "--ref_model_sync_steps 0 >= 1"),
    (["--loss", "dpo", "--f_divergence", "kl"], "invalid choice: 'kl'"),
])
def test_a_bad_objective_is_a_one_line_error_before_anything_is_written(flags, message, tiny_model_dir,
                                                                         tiny_prefs_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        train(tiny_model_dir, tiny_prefs_jsonl, out, *flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_mixtures_shared_hyperparameter_with_differing_defaults_is_one_flag_for_both(tmp_path):
    s, hyper = run_main(lambda *a: a, dpo.settings_classes, ["--loss", "dpo+lndpo", "--beta", "0.3"])
    objective = dpo.build_objective(s, hyper)
    assert [t.hyperparameters for t in objective.terms] == [{"beta": 0.3}, {"beta": 0.3}]
