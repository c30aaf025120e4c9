"""dpo.py and sft.py on a tiny Llama, in this process: every loss trains and saves a loadable model,
masks are exact, the reference cache is right, gradient accumulation is exact, dropout is off,
memory stays small, bad input fails in one line. Multi-process and kill/resume runs are in
test_train_processes.py."""
from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
from conftest import make_model, make_tokenizer, pref_rows, save_model_dir, sentence, write_jsonl
from transformers import AutoModelForCausalLM

import dpo
import sft
from brevity.batches import epoch_batches, micro_batches
from brevity.config import run_main
from brevity.dist import Dist
from brevity.fsdp import wrap_policy
from brevity.logprobs import SequenceLogps
from brevity.models import compute_dtype, load_model
from brevity.tokens import collate, encode_prompts, encode_responses
from losses import LOSSES, Objective, Term


def dpo_settings(model_dir, data, out, loss="dpo", **overrides):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), loss=loss, batch_size=8, max_steps=2,
                lr=1e-3, warmup_steps=0, save_every=0, compute_dtype="float32")  # bfloat16: test_precision.py
    return dpo.Settings(**{**base, **overrides}), dpo.loss_settings(loss)()


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def manual_sequence_logps(model, input_ids, response_mask):
    """The naive reference: full float32 log_softmax over [B, T, V], summed on response tokens."""
    logps = model(input_ids=input_ids).logits.float().log_softmax(-1)[:, :-1]
    token = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * response_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_and_saves_a_model_that_loads_with_the_same_logits(loss, tiny_model_dir,
                                                                              tiny_prefs_jsonl, tmp_path):
    out = tmp_path / "out"
    trained = dpo.main(*dpo_settings(tiny_model_dir, tiny_prefs_jsonl, out, loss))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
        start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert not torch.equal(start(input_ids=ids).logits, trained(input_ids=ids).logits)  # it did train
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                "logps/rejected", "length/chosen", "length/rejected", "grad_norm", "tokens", "lr"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert {"settings.json", "metrics.jsonl", "data_stats.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "settings.json").read_text())["loss"] == loss
    assert (out / dpo.REF_CACHE).exists() != LOSSES[loss].reference_free
    assert not list(out.glob("checkpoint-*"))


def test_sft_trains_and_saves_a_model_that_loads_with_the_same_logits(tiny_model_dir, tiny_sft_jsonl, tmp_path):
    out = tmp_path / "sft"
    s = sft.Settings(model=str(tiny_model_dir), data=str(tiny_sft_jsonl), output_dir=str(out), batch_size=8,
                     epochs=3, lr=3e-3)
    trained = sft.main(s)
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits,
                           trained(input_ids=ids).logits)
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_a_finished_run_is_not_redone(tiny_model_dir, tiny_prefs_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    dpo.main(*dpo_settings(tiny_model_dir, tiny_prefs_jsonl, out))
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert dpo.main(*dpo_settings(tiny_model_dir, tiny_prefs_jsonl, out, resume=True)) is None
    assert "already holds the trained model" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def boundary_merging_tokenizer():
    """A BPE tokenizer without pre-tokenization, so merges span anything: "ab" is one token."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.Fuse()  # decode concatenates the tokens
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=list("abxy "), show_progress=False)
    tok.train_from_iterator(["xab yab", "ab ab ab", "yyab xxab", "abab"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def check_exact_mask(tokenizer, model, prompt, response):
    prompt_ids, response_ids = encode_prompts(tokenizer, [prompt])[0], encode_responses(tokenizer, [response])[0]
    examples = [(prompt_ids, response_ids), (prompt_ids, [9, 9] + response_ids)]  # the second one pads the first
    input_ids, attention_mask, response_mask = collate(examples, tokenizer.pad_token_id)
    row, mask = input_ids[0], response_mask[0].bool()
    assert mask.sum() == len(response_ids) and response_ids[-1] == tokenizer.eos_token_id
    assert row[mask].tolist() == response_ids
    assert mask.nonzero().squeeze(-1).tolist() == list(range(len(prompt_ids), len(prompt_ids) + len(response_ids)))
    assert tokenizer.decode(row[mask][:-1]) == response
    with torch.no_grad():
        ours = SequenceLogps(model)(input_ids[:1], attention_mask[:1], response_mask[:1])
        assert torch.allclose(ours, manual_sequence_logps(model, input_ids[:1], response_mask[:1]), atol=1e-5)
    return prompt_ids, response_ids


def test_response_mask_is_exact_when_bpe_merges_across_the_boundary():
    tokenizer = boundary_merging_tokenizer()
    prompt, response = "yyxa", "b xab"
    joint = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    prompt_ids, response_ids = check_exact_mask(tokenizer, make_model(tokenizer), prompt, response)
    # The test means something: encoded jointly, one token ("ab") straddles the boundary.
    assert "ab" in tokenizer.convert_ids_to_tokens(joint) and joint != prompt_ids + response_ids[:-1]
    assert tokenizer.convert_ids_to_tokens(prompt_ids)[-1].endswith("a")
    assert tokenizer.convert_ids_to_tokens(response_ids)[0].startswith("b")


def test_response_mask_is_exact_with_a_chat_template(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    for prompt in ("list three fruits", [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "list three fruits"}]):
        prompt_ids, _ = check_exact_mask(tiny_tokenizer, model, prompt, "apple pear plum")
        assert tiny_tokenizer.decode(prompt_ids).startswith("<bos>")
        assert tiny_tokenizer.decode(prompt_ids).endswith("list three fruits<|assistant|>")


def test_preference_formats_string_trl_conversational_and_ultrafeedback_encode_alike(tiny_tokenizer):
    s = dpo.Settings()
    plain = {"prompt": "list three fruits", "chosen": "apple pear plum", "rejected": "red"}
    trl = {"prompt": [{"role": "user", "content": plain["prompt"]}],
           "chosen": [{"role": "assistant", "content": plain["chosen"]}],
           "rejected": [{"role": "assistant", "content": plain["rejected"]}]}
    user = {"role": "user", "content": plain["prompt"]}
    ultrafeedback = {"prompt": plain["prompt"],  # chosen and rejected are whole chats
                     "chosen": [user, {"role": "assistant", "content": plain["chosen"]}],
                     "rejected": [user, {"role": "assistant", "content": plain["rejected"]}]}
    encoded = [dpo.encode_pairs([row], tiny_tokenizer, s)[0] for row in (plain, trl, ultrafeedback)]
    assert encoded[0] == encoded[1] == encoded[2] and len(encoded[0]) == 1


def test_a_dataset_saved_with_datasets_trains_like_its_jsonl(tiny_model_dir, tmp_path):
    from datasets import Dataset

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],  # TRL's conversational format
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pref_rows(16, seed=5)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "dataset"))
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    for data in ("dataset", "prefs.jsonl"):
        dpo.main(*dpo_settings(tiny_model_dir, tmp_path / data, tmp_path / f"out_{data}", max_steps=1))
    assert read_metrics(tmp_path / "out_dataset")[0]["loss"] == read_metrics(tmp_path / "out_prefs.jsonl")[0]["loss"]


def test_sft_reads_prompt_response_and_messages_alike(tiny_tokenizer):
    s = sft.Settings()
    rows = [{"prompt": "list three fruits", "response": "apple pear plum"},
            {"messages": [{"role": "user", "content": "list three fruits"},
                          {"role": "assistant", "content": "apple pear plum"}]}]
    examples, stats = sft.encode_examples(rows, tiny_tokenizer, s)
    assert examples[0] == examples[1] and stats["examples"] == 2
    assert examples[0][1] == encode_responses(tiny_tokenizer, ["apple pear plum"])[0]


def test_sft_loss_is_the_mean_nll_of_response_tokens_only(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    examples, _ = sft.encode_examples([{"prompt": sentence(random.Random(i), 3, 9), "response": "apple pear"}
                                       for i in range(4)], tiny_tokenizer, sft.Settings())
    sums = sft.accumulate_gradients(wrap_policy(model, Dist()), examples, [0, 1, 2, 3], sft.Settings(),
                                    tiny_tokenizer.pad_token_id, Dist())
    nll, tokens = sums["nll"], sums["response_tokens"]
    ids, _, mask = collate(examples, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = -manual_sequence_logps(model, ids, mask).sum() / mask.sum()
    assert tokens == mask.sum() and abs(nll / tokens - expected) < 1e-5


def rows_with_a_long_prompt_and_a_long_chosen() -> list[dict]:
    rows = pref_rows(16)
    rows[0]["prompt"] = " ".join(["the cat sat on the mat"] * 30)  # far past max_prompt_length
    rows[1]["chosen"] = " ".join(["apple pear plum"] * 40)  # the pair cannot fit max_length
    return rows


def test_long_prompts_are_cut_from_the_left_and_pairs_that_do_not_fit_are_dropped(tiny_model_dir, tmp_path, capsys):
    """Counted in data_stats.json and printed: truncation is never silent."""
    data = write_jsonl(tmp_path / "prefs.jsonl", rows_with_a_long_prompt_and_a_long_chosen())
    out = tmp_path / "out"
    s, hyper = dpo_settings(tiny_model_dir, data, out, max_length=80, max_prompt_length=40, max_steps=1)
    dpo.main(s, hyper)
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats == {"rows": 16, "pairs": 15, "prompts_cut": 1, "responses_cut": 0, "dropped_too_long": 1,
                     "dropped_identical": 0, "sampled_token_ids": 0}
    assert "1 prompts cut from the left to 40 tokens; 1 pairs dropped" in capsys.readouterr().out


def test_truncate_responses_keeps_a_pair_that_does_not_fit_by_cutting_its_responses(tiny_tokenizer):
    s = dpo.Settings(max_length=80, max_prompt_length=40, truncate_responses=True)
    pairs, stats = dpo.encode_pairs(rows_with_a_long_prompt_and_a_long_chosen(), tiny_tokenizer, s)
    assert stats["pairs"] == 16 and stats["responses_cut"] == 1
    assert all(len(p) <= 40 and len(p) + max(len(c), len(r)) <= 80 for p, c, r in pairs)


def test_a_prompt_cut_to_max_prompt_length_keeps_its_end(tiny_tokenizer):
    rows = rows_with_a_long_prompt_and_a_long_chosen()
    pairs, _ = dpo.encode_pairs(rows, tiny_tokenizer, dpo.Settings(max_length=80, max_prompt_length=40))
    full_prompt = encode_prompts(tiny_tokenizer, [rows[0]["prompt"]])[0]
    assert len(full_prompt) > 40 and pairs[0][0] == full_prompt[-40:]


@pytest.fixture(scope="module")
def one_dpo_step(tiny_model_dir, tiny_prefs_jsonl, tiny_tokenizer, tmp_path_factory) -> dict:
    """One DPO step on the tiny prefs; the run's pairs and cached reference log-probs ([32] each), and a
    batch of every third pair (chosen rows, then rejected rows), unlike the cache pass's length-sorted ones."""
    out = tmp_path_factory.mktemp("one_dpo_step") / "out"
    s, hyper = dpo_settings(tiny_model_dir, tiny_prefs_jsonl, out, max_steps=1)
    dpo.main(s, hyper)
    pairs, _ = dpo.encode_pairs([json.loads(x) for x in tiny_prefs_jsonl.read_text().splitlines()], tiny_tokenizer, s)
    cached = dpo.read_ref_cache(out / dpo.REF_CACHE, dpo.ref_cache_key(pairs, str(tiny_model_dir), s.dtype,
                                                                        compute_dtype(s.compute_dtype, "cpu")))
    batch = list(range(0, 32, 3))
    tensors = collate([(pairs[i][0], pairs[i][1]) for i in batch] + [(pairs[i][0], pairs[i][2]) for i in batch],
                      tiny_tokenizer.pad_token_id)
    return {"out": out, "settings": s, "pairs": pairs, "cached": cached, "batch": batch, "tensors": tensors}


def test_cached_reference_logps_equal_a_live_reference(one_dpo_step, tiny_model_dir):
    cached, batch, n = one_dpo_step["cached"], one_dpo_step["batch"], len(one_dpo_step["batch"])
    assert cached is not None and cached[0].shape == cached[1].shape == (32,)
    input_ids, _, response_mask = one_dpo_step["tensors"]
    with torch.no_grad():
        live_logps = manual_sequence_logps(load_model(str(tiny_model_dir)), input_ids, response_mask)
    assert torch.allclose(live_logps[:n], cached[0][batch], atol=1e-4, rtol=0)
    assert torch.allclose(live_logps[n:], cached[1][batch], atol=1e-4, rtol=0)


def test_at_step_0_the_policy_is_the_reference_so_every_dpo_loss_is_log_2_and_every_reward_0(one_dpo_step,
                                                                                              tiny_model_dir):
    cached, batch, n = one_dpo_step["cached"], one_dpo_step["batch"], len(one_dpo_step["batch"])
    input_ids, attention_mask, response_mask = one_dpo_step["tensors"]
    policy = wrap_policy(load_model(str(tiny_model_dir)), Dist())
    with torch.no_grad():
        logps = policy(input_ids, attention_mask, response_mask)
    losses, chosen_rewards, rejected_rewards = LOSSES["dpo"].fn(
        policy_chosen_logps=logps[:n], policy_rejected_logps=logps[n:],
        reference_chosen_logps=cached[0][batch], reference_rejected_logps=cached[1][batch],
        chosen_lengths=response_mask[:n].sum(-1), rejected_lengths=response_mask[n:].sum(-1))
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6, rtol=0)
    assert chosen_rewards.abs().max() < 1e-6 and rejected_rewards.abs().max() < 1e-6
    first = read_metrics(one_dpo_step["out"])[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6 and abs(first["rewards/margin"]) < 1e-6


def test_ref_model_flag_uses_that_model_for_the_reference_logps(tiny_tokenizer, tiny_prefs_jsonl, tmp_path):
    policy_dir = save_model_dir(tmp_path / "policy", tiny_tokenizer, seed=0)
    ref_dir = save_model_dir(tmp_path / "ref", tiny_tokenizer, seed=1)
    s, hyper = dpo_settings(policy_dir, tiny_prefs_jsonl, tmp_path / "out", max_steps=1, ref_model=str(ref_dir))
    dpo.main(s, hyper)
    pairs, _ = dpo.encode_pairs([json.loads(x) for x in tiny_prefs_jsonl.read_text().splitlines()], tiny_tokenizer, s)
    chosen, _ = dpo.read_ref_cache(tmp_path / "out" / dpo.REF_CACHE, dpo.ref_cache_key(pairs, str(ref_dir), s.dtype,
                                                                                        compute_dtype(s.compute_dtype, "cpu")))
    input_ids, _, response_mask = collate([(p, c) for p, c, _ in pairs[:4]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        by_ref = manual_sequence_logps(load_model(str(ref_dir)), input_ids, response_mask)
        by_policy = manual_sequence_logps(load_model(str(policy_dir)), input_ids, response_mask)
    assert torch.allclose(by_ref, chosen[:4], atol=1e-4, rtol=0)
    assert not torch.allclose(by_policy, chosen[:4], atol=1e-4, rtol=0)  # the two models tell apart


def test_the_reference_cache_is_read_only_under_its_key_of_model_and_data(one_dpo_step, tiny_model_dir):
    s, pairs, cache = one_dpo_step["settings"], one_dpo_step["pairs"], one_dpo_step["out"] / dpo.REF_CACHE
    compute = compute_dtype(s.compute_dtype, "cpu")
    key = dpo.ref_cache_key(pairs, str(tiny_model_dir), s.dtype, compute)
    assert key != dpo.ref_cache_key(pairs, str(tiny_model_dir) + "_other", s.dtype, compute)
    assert key != dpo.ref_cache_key(pairs[1:], str(tiny_model_dir), s.dtype, compute)
    assert key != dpo.ref_cache_key(pairs, str(tiny_model_dir), s.dtype,
                                    torch.bfloat16 if compute == torch.float32 else torch.float32)
    assert dpo.read_ref_cache(cache, key) is not None and dpo.read_ref_cache(cache, "another key") is None


def grads_after(accumulate, grad_accum):
    tokenizer = make_tokenizer()
    policy = wrap_policy(make_model(tokenizer), Dist())
    accumulate(policy, tokenizer, grad_accum)
    return {n: p.grad.clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("stage, options", [("dpo", {}), ("dpo", {"ld_alpha": 0.5}), ("dpo", {"sampo": True}),
                                            ("dpo", {"use_weighting": True}), ("sft", {})],
                         ids=["dpo", "dpo-ld_alpha", "dpo-sampo", "dpo-wpo", "sft"])
def test_gradient_accumulation_is_exact(stage, options):
    """One micro-batch of 4 and four micro-batches of 1 give the same gradient, with per-sequence sums
    and with the per-token options (LD-DPO and SamPO read a per-token reference cache; WPO log sum p^2)."""
    rows = pref_rows(4, seed=3)

    def accumulate(policy, tokenizer, grad_accum):
        if stage == "dpo":
            s = dpo.Settings(batch_size=4, grad_accum=grad_accum)
            pairs, _ = dpo.encode_pairs(rows, tokenizer, s)
            objective = Objective((Term("ilrdpo", 1.0, {"beta": 0.1, "alpha": 0.05}),), **options)
            per_token = "reference_tokens" in objective.needs
            n_chosen, n_rejected = (sum(len(p[k]) for p in pairs) if per_token else 4 for k in (1, 2))
            ref = (torch.linspace(-4, -2, n_chosen), torch.linspace(-3.5, -2.5, n_rejected))
            dpo.accumulate_gradients(policy, pairs, [0, 1, 2, 3], 7, objective,
                                     dpo.cached_reference(ref, pairs, per_token), s, tokenizer.pad_token_id, Dist())
        else:
            s = sft.Settings(batch_size=4, grad_accum=grad_accum)
            examples, _ = sft.encode_examples([{"prompt": r["prompt"], "response": r["chosen"]} for r in rows],
                                              tokenizer, s)
            sft.accumulate_gradients(policy, examples, [0, 1, 2, 3], s, tokenizer.pad_token_id, Dist())

    one, four = grads_after(accumulate, 1), grads_after(accumulate, 4)
    for name in one:
        assert torch.allclose(one[name], four[name], atol=1e-7, rtol=1e-5), name


def test_activation_checkpointing_gives_the_same_log_probs_and_gradients(tiny_tokenizer):
    batch = collate([([1, 40, 41, 42], [43, 44, 2]), ([1, 45], [46, 47, 48, 2])], tiny_tokenizer.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        policy = wrap_policy(make_model(tiny_tokenizer), Dist(), activation_checkpointing=checkpointing)
        logps = policy(*batch)
        logps.sum().backward()
        grads.append((logps.detach(), {n: p.grad for n, p in policy.named_parameters()}))
    assert torch.equal(grads[0][0], grads[1][0])
    for name, grad in grads[0][1].items():
        assert torch.allclose(grad, grads[1][1][name], atol=1e-7, rtol=1e-5), name


def test_dropout_is_off_while_training(tiny_tokenizer, tmp_path):
    model_dir = save_model_dir(tmp_path / "dropout", tiny_tokenizer, attention_dropout=0.5)
    policy = wrap_policy(load_model(str(model_dir)), Dist())
    batch = collate([([1, 40, 41, 42], [43, 44, 2]), ([1, 45], [46, 47, 48, 2])], tiny_tokenizer.pad_token_id)
    first, second = policy(*batch), policy(*batch)  # with autograd on, as in training
    assert torch.equal(first, second)
    policy.train()  # the test means something: with dropout on they differ
    assert not torch.equal(policy(*batch), policy(*batch))


def saved_tensor_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_logps_memory_is_far_below_a_naive_float32_log_softmax():
    """The log-prob computation never holds [B, T, V] float32 logits for backward: T 2048, V 32000,
    512-token chunks save under a twentieth of one [T, V] float32 tensor; the naive way saves more than it."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, vocab_size=32000, num_hidden_layers=1)
    length, prompt = 2048, 512
    ids = torch.randint(3, 32000, (1, length))
    attention_mask = torch.ones_like(ids)
    response_mask = torch.zeros_like(ids)
    response_mask[:, prompt:] = 1
    ours = saved_tensor_bytes(lambda: SequenceLogps(model, chunk_size=512)(ids, attention_mask, response_mask))
    naive = saved_tensor_bytes(lambda: manual_sequence_logps(model, ids, response_mask))
    logits_bytes = length * 32000 * 4
    print(f"\nsaved for backward, T={length}, V=32000: naive {naive / 2**20:.0f} MiB, ours {ours / 2**20:.1f} MiB, "
          f"ratio {naive / ours:.0f}x; one [T, V] float32 = {logits_bytes / 2**20:.0f} MiB")
    assert naive > logits_bytes  # the naive way keeps (at least) the float32 logits
    assert ours < logits_bytes / 20


def lognormal_lengths() -> list[int]:
    rng = random.Random(0)
    return [int(rng.lognormvariate(4, 0.8)) + 1 for _ in range(1024)]


def test_epoch_batches_are_deterministic_for_a_seed_and_epoch_and_change_with_the_epoch():
    lengths = lognormal_lengths()
    batches = epoch_batches(lengths, 16, seed=0, epoch=0, bucket_batches=32)
    assert batches == epoch_batches(lengths, 16, seed=0, epoch=0, bucket_batches=32)
    assert batches != epoch_batches(lengths, 16, seed=0, epoch=1, bucket_batches=32)


def test_epoch_batches_hold_every_example_once():
    batches = epoch_batches(lognormal_lengths(), 16, seed=0, epoch=0, bucket_batches=32)
    assert sorted(i for b in batches for i in b) == list(range(1024))


def test_length_buckets_cut_padding_to_under_a_fifth_of_random_batches():
    """Padding: sum over batches of size x longest length, over the real tokens, minus 1."""
    lengths = lognormal_lengths()

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs) / sum(lengths) - 1

    random_batches = [list(range(i, i + 16)) for i in range(0, 1024, 16)]
    assert padding(epoch_batches(lengths, 16, seed=0, epoch=0, bucket_batches=32)) < padding(random_batches) / 5


def test_two_processes_hold_the_examples_of_one_process_with_two_micro_steps():
    batch = epoch_batches(lognormal_lengths(), 16, seed=0, epoch=0, bucket_batches=32)[0]
    two_processes = [micro_batches(batch, 2, rank, 1)[0] for rank in range(2)]
    assert two_processes == micro_batches(batch, 1, 0, 2)
    assert sorted(sum(two_processes, [])) == sorted(batch)


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--loss", "dpo", "--alpha", "0.5"], "--alpha is not a hyperparameter of loss 'dpo' (it has: --beta)"),
    (["--loss", "nope"], "unknown --loss 'nope'"),
    (["--data", "/nonexistent/prefs.jsonl", "--model", "MODEL"], "/nonexistent/prefs.jsonl: file not found"),
    (["--config", "CONFIG"], "unknown key 'bogus_key'"),
])
def test_bad_flags_and_inputs_fail_in_one_line(argv, message, tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("lr: 1.0e-4\nbogus_key: 1\n")
    argv = [str(tiny_model_dir) if a == "MODEL" else str(config) if a == "CONFIG" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        run_main(dpo.main, dpo.settings_classes, argv + ["--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e38"], "--lr 1e+38: need 0 < lr < 1e30"),  # was a float32 overflow traceback in AdamW
    (["--lr", "nan"], "--lr nan: not a finite number"),  # every float setting, before its range check
    (["--max_grad_norm", "-1"], "--max_grad_norm -1.0: need finite values >= 0"),
])
def test_out_of_range_optimizer_settings_fail_in_one_line_before_training(flags, message, tiny_model_dir,
                                                                         tiny_prefs_jsonl, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--data", str(tiny_prefs_jsonl), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "2", *flags]
    with pytest.raises(SystemExit) as exit_:
        run_main(dpo.main, dpo.settings_classes, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_loss_hyperparameters_are_flags_with_the_loss_defaults_and_config_keys(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("loss: simpo\ngamma: 0.5\n")
    s, hyper = dpo.run_main(lambda *a: a, dpo.settings_classes, ["--config", str(config), "--beta", "3"])
    assert s.loss == "simpo" and dataclasses.asdict(hyper) == {"beta": 3.0, "gamma": 0.5}
    _, hyper = dpo.run_main(lambda *a: a, dpo.settings_classes, ["--loss", "ilrdpo"])
    assert dataclasses.asdict(hyper) == {"beta": 0.1, "alpha": 0.01}
