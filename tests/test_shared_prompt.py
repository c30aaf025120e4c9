"""A pair as one row (brevity.tokens.collate_pairs): prompt + chosen + rejected, the prompt computed once.

Every log-prob must be the one the pair's two sequences give on their own, computed the naive way
(each (prompt, response) sequence through the full LM alone): per sequence, per token, WPO's
log sum p^2, and the gradients, on both tiny models; and dpo.py must train alike either way.
"""
from __future__ import annotations

import json

import pytest
import torch
from test_train import dpo_settings

import dpo
from brevity.logprobs import SequenceLogps, response_logps
from brevity.models import load_model
from brevity.tokens import collate, collate_pairs

PAIRS = [  # (prompt, chosen, rejected) ids: different lengths, a one-token response, a one-token prompt
    ([1, 4, 5, 6], [7, 8, 2], [9, 10, 11, 12, 2]),
    ([1, 13], [14, 15, 16, 17, 18, 2], [2]),
    ([1], [4, 2], [5, 6, 2]),
    ([1, 7, 8, 9, 10, 11, 12], [13, 2], [14, 15, 2]),
]


def alone(model, prompt, response):
    """log pi(y_t | x, y_<t) of each response token, the sequence alone through the full LM, float32."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
    return logits[torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1), torch.tensor(response)]


def test_the_layout_is_prompt_then_chosen_then_rejected_and_rejected_tokens_never_see_chosen_ones():
    batch = collate_pairs(PAIRS[:1], pad_id=0)
    p, c, r = PAIRS[0]
    assert batch.input_ids[0].tolist() == p + c + r
    assert batch.position_ids[0].tolist() == list(range(len(p) + len(c))) + list(range(len(p), len(p) + len(r)))
    mask = batch.attention_mask[0, 0]
    first_rejected = len(p) + len(c)
    assert mask[first_rejected].tolist() == [True] * len(p) + [False] * len(c) + [True] + [False] * (len(r) - 1)
    assert mask[len(p)].tolist() == [True] * (len(p) + 1) + [False] * (len(c) + len(r) - 1)
    # both responses' first tokens are predicted from the prompt's last position
    assert batch.source[0] == batch.source[len(c)] == len(p) - 1
    assert batch.owner.tolist() == [0] * len(c) + [1] * len(r)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "policy_dir"])
def test_shared_rows_give_each_sequences_own_log_probs_and_gradients(model_fixture, request):
    model = load_model(str(request.getfixturevalue(model_fixture)))
    policy = SequenceLogps(model, chunk_size=5)  # chunks that cut through the responses
    want_tokens = [alone(model, p, c) for p, c, _ in PAIRS] + [alone(model, p, r) for p, _, r in PAIRS]
    want = torch.stack([t.sum() for t in want_tokens])
    shared = policy(collate_pairs(PAIRS, pad_id=0))
    assert torch.allclose(shared, want, atol=1e-5)
    per_token, log_sum_sq = policy(collate_pairs(PAIRS, pad_id=0), per_token=True, sum_sq=True)
    plain_tokens, plain_sum_sq = policy(*collate([(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS], 0),
                                        per_token=True, sum_sq=True)
    for row, t in enumerate(want_tokens):
        assert torch.allclose(per_token[row, :len(t)], t, atol=1e-5)
        assert not per_token[row, len(t):].any()
    assert torch.allclose(log_sum_sq, plain_sum_sq, atol=1e-5)
    shared.sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    policy(*collate([(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS], 0)).sum().backward()
    for g, p in zip(shared_grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)


def test_the_reference_pass_over_triples_equals_the_pass_over_their_sequences(tiny_model_dir):
    policy = SequenceLogps(load_model(str(tiny_model_dir)))
    sequences = [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]
    for per_token in (False, True):
        shared = response_logps(policy, PAIRS, 3, pad_id=0, per_token=per_token)
        plain = response_logps(policy, sequences, 3, pad_id=0, per_token=per_token)
        assert shared.shape == plain.shape
        assert torch.allclose(shared, plain, atol=1e-5)


def test_dpo_trains_the_same_steps_with_and_without_shared_prompts(tiny_model_dir, tiny_prefs_jsonl, tmp_path):
    runs = {}
    for shared in (True, False):
        # bucket_batches 1: a window is one batch, so every batch holds the same pairs whatever the layout's
        # length key (only their order within the batch differs)
        s, h = dpo_settings(tiny_model_dir, tiny_prefs_jsonl, tmp_path / str(shared), "dpo", max_steps=3,
                            bucket_batches=1, shared_prompt=shared)
        dpo.main(s, h)
        lines = (tmp_path / str(shared) / "metrics.jsonl").read_text().splitlines()
        runs[shared] = [json.loads(line) for line in lines]
    for ours, theirs in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm", "tokens"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (ours["step"], key)


def test_a_model_with_a_sliding_window_shorter_than_max_length_trains_on_two_sequences(tiny_tokenizer,
                                                                                       tiny_prefs_jsonl, tmp_path,
                                                                                       capsys):
    """A pair's own [B, 1, T, T] mask replaces the one the model builds, window included, so a Mistral
    attending over 4 tokens gets other log-probs from shared rows; dpo.py says so in one line and
    computes (its cached reference log-probs here) as two sequences, the model's own values."""
    from transformers import MistralConfig, MistralForCausalLM

    from brevity.models import DTYPES

    config = MistralConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model_dir = tmp_path / "mistral"
    MistralForCausalLM(config).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    s, h = dpo_settings(model_dir, tiny_prefs_jsonl, out, "dpo", max_steps=1)
    dpo.main(s, h)
    assert ("--shared_prompt off: the model attends within a window of 4 tokens, less than --max_length 1024"
            in capsys.readouterr().out)
    assert json.loads((out / "settings.json").read_text())["shared_prompt"] is False
    pairs, _ = dpo.encode_pairs([json.loads(x) for x in tiny_prefs_jsonl.read_text().splitlines()], tiny_tokenizer, s)
    key = dpo.ref_cache_key(pairs, str(model_dir), s.dtype, DTYPES["float32"], shared_prompt=False)
    chosen, _ = dpo.read_ref_cache(out / dpo.REF_CACHE, key)
    model = load_model(str(model_dir))
    with torch.no_grad():
        own = torch.stack([alone(model, p, c).sum() for p, c, _ in pairs])
        shared = response_logps(SequenceLogps(model), pairs, 8, pad_id=0)[:len(pairs)]
    assert torch.allclose(chosen, own, atol=1e-4)
    assert (shared - own).abs().max() > 1e-2  # what shared rows would have trained on
