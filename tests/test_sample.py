"""sample.py: batched, length-sorted, left-padded generation that matches one-by-one generation;
finish reasons; input order; determinism per seed (whatever the batch size); resume after an
interruption. The policy is conftest's word-level tiny Llama (`policy_dir`)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORD_VOCAB, write_jsonl

from brevity import config, files, generation, models
from brevity.tokens import encode_prompts
import sample


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORD_VOCAB) for _ in range(rng.randint(1, 9))), "id": i} for i in range(n)]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", prompt_rows(10))


def run_sample(policy_dir, prompts_file, output, **overrides) -> list[dict]:
    overrides = {"max_new_tokens": 8, **overrides}
    s = sample.Settings(model=str(policy_dir), prompts=str(prompts_file), output=str(output), **overrides)
    sample.main(s)
    return files.read_jsonl(output)


def one_by_one_greedy(policy_dir, prompts, max_new_tokens) -> list[list[int]]:
    """Plain transformers greedy generation, one unpadded prompt at a time, in dataset order."""
    tokenizer = models.load_tokenizer(str(policy_dir))
    model = models.load_model(str(policy_dir))
    out = []
    for p in prompts:
        ids = torch.tensor([encode_prompts(tokenizer, [p])[0]])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)[0, ids.shape[1]:].tolist()
        out.append(new[:new.index(2) + 1] if 2 in new else new)
    return out


def test_sorted_left_padded_batches_match_one_by_one_greedy(policy_dir, prompts_file, tmp_path):
    rows = run_sample(policy_dir, prompts_file, tmp_path / "s.jsonl", n=1, temperature=0.0, batch_size=4,
                      max_new_tokens=12)
    tokenizer = models.load_tokenizer(str(policy_dir))
    expected = one_by_one_greedy(policy_dir, [r["prompt"] for r in rows], 12)
    assert len({r["responses"][0]["text"] for r in rows}) > 1  # the test would be weak if all were equal
    for row, tokens in zip(rows, expected):
        response = row["responses"][0]
        assert response["num_tokens"] == len(tokens)
        assert response["text"] == tokenizer.decode([t for t in tokens if t != 2], skip_special_tokens=True)


def test_response_cut_at_max_new_tokens_is_marked_length(policy_dir, prompts_file, tmp_path):
    rows = run_sample(policy_dir, prompts_file, tmp_path / "s.jsonl", n=4, temperature=1.0, max_new_tokens=6)
    responses = [r for row in rows for r in row["responses"]]
    assert {r["finish_reason"] for r in responses} == {"eos", "length"}  # both occur with this seed
    for r in responses:
        if r["finish_reason"] == "length":
            assert r["num_tokens"] == 6
        else:
            assert 1 <= r["num_tokens"] <= 6  # EOS counted


def test_prompts_cut_to_max_prompt_length_are_counted(policy_dir, prompts_file, tmp_path, capsys):
    tokenizer = models.load_tokenizer(str(policy_dir))
    lengths = [len(x) for x in encode_prompts(tokenizer, [r["prompt"] for r in prompt_rows(10)])]
    limit = sorted(lengths)[5]  # some prompts longer, some not
    run_sample(policy_dir, prompts_file, tmp_path / "s.jsonl", max_prompt_length=limit)
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < 10
    assert f"{expected} of 10 prompts cut from the left to --max_prompt_length {limit}" in capsys.readouterr().out


def test_output_rows_follow_input_order_and_keep_fields(policy_dir, tmp_path):
    inputs = prompt_rows(7, seed=3)
    inputs[2] = {"prompt": [{"role": "user", "content": "list two fruits"}], "id": 2, "chosen": "apple and pear"}
    rows = run_sample(policy_dir, write_jsonl(tmp_path / "p.jsonl", inputs), tmp_path / "s.jsonl", n=3, batch_size=2)
    assert [r["id"] for r in rows] == list(range(7))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in inputs]
    assert rows[2]["chosen"] == "apple and pear"
    assert all(len(r["responses"]) == 3 and set(r["responses"][0]) == {"text", "token_ids", "num_tokens", "finish_reason"}
               for r in rows)


def test_same_seed_gives_identical_file(policy_dir, prompts_file, tmp_path):
    run_sample(policy_dir, prompts_file, tmp_path / "a.jsonl", seed=5)
    run_sample(policy_dir, prompts_file, tmp_path / "b.jsonl", seed=5)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_another_seed_gives_other_responses(policy_dir, prompts_file, tmp_path):
    a = run_sample(policy_dir, prompts_file, tmp_path / "a.jsonl", seed=5)
    c = run_sample(policy_dir, prompts_file, tmp_path / "c.jsonl", seed=6)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in c]
    assert [r["responses"] for r in a] != [r["responses"] for r in c]


def test_samples_do_not_depend_on_batch_composition(policy_dir, prompts_file, tmp_path):
    """Each response has its own noise stream, so batch size 1 and batch size 7 give the same file."""
    run_sample(policy_dir, prompts_file, tmp_path / "a.jsonl", batch_size=1, save_every=0)
    run_sample(policy_dir, prompts_file, tmp_path / "b.jsonl", batch_size=7, save_every=3)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_interrupted_run_resumes_where_it_stopped(policy_dir, prompts_file, tmp_path, monkeypatch):
    run_sample(policy_dir, prompts_file, tmp_path / "full.jsonl", save_every=3)
    calls = []
    real = sample.generate_responses

    def dies_on_third_part(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "generate_responses", dies_on_third_part)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_sample(policy_dir, prompts_file, out, save_every=3)
    assert not out.exists() and len(list(sample.parts_dir(str(out)).glob("part-*.jsonl"))) == 2
    calls.clear()
    run_sample(policy_dir, prompts_file, out, save_every=3)
    assert sum(calls) == 4 * (10 - 6)  # only the 4 prompts not yet done, n = 4 each
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert not sample.parts_dir(str(out)).exists()


def test_complete_output_is_not_sampled_again(policy_dir, prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "s.jsonl"
    run_sample(policy_dir, prompts_file, out, n=1)
    monkeypatch.setattr(sample, "generate_responses", lambda *a, **k: pytest.fail("sampled again"))
    run_sample(policy_dir, prompts_file, out, n=1)


def test_parts_of_a_run_with_other_settings_are_an_error(policy_dir, prompts_file, tmp_path):
    out = tmp_path / "s.jsonl"
    folder = sample.parts_dir(str(out))
    folder.mkdir()
    (folder / "run_key.json").write_text(sample.run_key(sample.Settings(seed=99), []), encoding="utf-8")
    with pytest.raises(config.UserError, match="other settings"):
        run_sample(policy_dir, prompts_file, out)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_engine_without_vllm_is_a_one_line_error(policy_dir, prompts_file, tmp_path):
    with pytest.raises(config.UserError, match="vllm is not installed"):
        run_sample(policy_dir, prompts_file, tmp_path / "s.jsonl", engine="vllm")


def test_seeded_sampler_draws_from_the_tempered_softmax_and_respects_top_p():
    """Gumbel-max with hashed noise: over 20000 streams the token frequencies match softmax(logits / T)
    within 4 standard errors; with top_p 0.7 only the top tokens that reach 0.7 of the mass occur."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    seeds = torch.tensor([generation.response_seed(0, i, 0) for i in range(n)])
    scores = logits.expand(n, -1).clone()
    chosen = generation.SeededSampler(seeds, 0.8, 1.0)(scores, 0)
    freq = torch.bincount(chosen, minlength=5).float() / n
    p = (logits / 0.8).softmax(-1)
    assert torch.all((freq - p).abs() < 4 * (p * (1 - p) / n).sqrt() + 1e-3)
    top = generation.SeededSampler(seeds, 1.0, 0.7)(scores, 0)
    assert set(top.tolist()) == {0, 1}  # softmax mass: 0.61, 0.22 (cumulative 0.84 >= 0.7), ...


def test_stream_gumbel_is_its_defining_formula_bit_for_bit():
    """stream_gumbel works in place for speed; its noise must stay the defining out-of-place formula's,
    bit for bit (saved samples depend on it): u = (bits 11..63 of mix64(seed + ((step << 24) + v) x
    golden) + 0.5) / 2^53, g = -log(-log(u))."""
    def mix64(x):  # generation._mix64 on int64 tensors, out of place
        x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * generation._signed(generation._MIX1)
        x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * generation._signed(generation._MIX2)
        return x ^ ((x >> 31) & ((1 << 33) - 1))

    def defined(seeds, step, vocab):
        counter = (step << 24) + torch.arange(vocab, dtype=torch.int64)
        bits = mix64(seeds.unsqueeze(1) + counter.unsqueeze(0) * generation._signed(generation._GOLDEN))
        u = (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) / 2.0**53
        return -torch.log(-torch.log(u))

    seeds = torch.tensor([generation.response_seed(seed, p, i) for seed, p, i in [(0, 0, 0), (1, 2, 3), (-5, 7, 1),
                                                                              (2**40, 0, 9)]])
    for step in (0, 1, 127, 4096):
        assert torch.equal(generation.stream_gumbel(seeds, step, 1000), defined(seeds, step, 1000))


@pytest.mark.parametrize("temperature, rows", [(1.0, None), (0.7, [6, 0, 3, 4, 5])])
def test_the_sampler_draws_the_same_tokens_a_few_rows_at_a_time(monkeypatch, temperature, rows):
    """The sampler makes its noise a few rows at a time (to stay in cache): the tokens are argmax(logits / T
    + g) over the whole batch's noise, whatever the chunk, for the rows still in the batch too."""
    seeds = torch.tensor([generation.response_seed(0, i, 0) for i in range(7)])
    live = seeds if rows is None else seeds[rows]
    logits = torch.randn(len(live), 1000, generator=torch.Generator().manual_seed(0))
    whole = ((logits / temperature).double() + generation.stream_gumbel(live, 3, 1000)).argmax(-1)
    monkeypatch.setattr(generation, "NOISE_ELEMENTS", 2000)  # two rows at a time, the last one alone
    assert torch.equal(generation.SeededSampler(seeds, temperature)(logits, 3, rows), whole)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_preallocated_kv_cache_gives_the_scores_of_transformers_own_cache(policy_dir):
    """Left-padded prompts of different lengths, greedy: every step's scores with the in-place cache
    equal those with transformers' DynamicCache exactly, so the tokens are the same."""
    tokenizer, model = models.load_tokenizer(str(policy_dir)), models.load_model(str(policy_dir))
    prompts = [encode_prompts(tokenizer, [r["prompt"]])[0] for r in prompt_rows(5)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    kwargs = dict(input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False, max_new_tokens=12,
                  pad_token_id=0, eos_token_id=[], return_dict_in_generate=True, output_scores=True)
    own = model.generate(**kwargs)
    ours = model.generate(**kwargs, past_key_values=generation.preallocated_kv_cache(model.config, width + 12))
    assert torch.equal(ours.sequences, own.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, own.scores, strict=True))


class AsLogitsProcessor:
    """A SeededSampler as a transformers logits processor: only the chosen token stays finite, so
    `generate(do_sample=False)` takes it (how sample.py sampled before it had its own decode loop)."""

    def __init__(self, sampler, width):
        self.sampler, self.width = sampler, width

    def __call__(self, input_ids, scores):
        choice = self.sampler(scores, input_ids.shape[1] - self.width)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice.unsqueeze(1), 0.0)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_decode_drops_finished_rows_and_gives_generates_tokens(policy_dir, temperature):
    """generation.decode takes a row out of the batch when it emits EOS; every row's tokens are still
    those of transformers' generate over the whole batch (same sampler, same left-padded prompts),
    and the batch really shrinks (rows stop at different steps here)."""
    from transformers import LogitsProcessorList

    tokenizer, model = models.load_tokenizer(str(policy_dir)), models.load_model(str(policy_dir))
    prompts = [encode_prompts(tokenizer, [r["prompt"]])[0] for r in prompt_rows(12, seed=5)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    seeds = torch.tensor([generation.response_seed(0, i, 0) for i in range(len(prompts))])
    sampler = generation.SeededSampler(seeds, temperature)
    batch_sizes = []
    real_forward = model.forward
    model.forward = lambda *a, **k: batch_sizes.append(k["input_ids"].shape[0]) or real_forward(*a, **k)
    ours = generation.decode(model, ids, mask, sampler, 16, [2])
    model.forward = real_forward
    own = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                         eos_token_id=2, logits_processor=LogitsProcessorList([AsLogitsProcessor(sampler, width)]))
    expected = [row[:row.index(2) + 1] if 2 in row else row for row in own[:, width:].tolist()]
    assert ours == expected
    lengths = sorted(len(t) for t in ours)
    assert len(set(lengths)) > 2 and lengths[-1] == 16  # rows end at several steps; some never do
    assert batch_sizes[0] == 12 and batch_sizes[-1] < 12  # finished rows left the batch
    assert len(batch_sizes) == 16 and batch_sizes == sorted(batch_sizes, reverse=True)


@pytest.mark.slow
def test_two_processes_write_the_same_file_as_one(policy_dir, prompts_file, tmp_path):
    """torchrun, 2 CPU processes (gloo): strided prompts, gathered to rank 0, in input order; the
    per-response seeds make the file equal to one process's with another batch size."""
    run_sample(policy_dir, prompts_file, tmp_path / "one.jsonl", batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    root = Path(sample.__file__).resolve().parent
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(root / "sample.py"), "--model", str(policy_dir), "--prompts", str(prompts_file),
                          "--output", str(tmp_path / "two.jsonl"), "--num_responses", "4", "--max_new_tokens", "8",
                          "--batch_size", "3", "--save_every", "2"], env=env, cwd=tmp_path, timeout=300,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
