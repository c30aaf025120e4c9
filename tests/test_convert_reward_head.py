"""examples/convert_reward_head.py, on the two layouts the recipes' reward models ship in, built tiny here.

Starling-RM-34B's model-card layout (`transformer` = LlamaModel, `v_head` = Linear(hidden, 1, bias=False),
reward at the token before the first pad id 0) and OpenAssistant's GPTNeoXRewardModel (`gpt_neox` =
GPTNeoXModel, `out_proj` = Linear(hidden, 1) with a bias, "last" pooling: the hidden state at the last
token the attention mask keeps; a pytorch_model.bin written by transformers 4.28, causal-mask buffers
included), converted, score exactly as their own code does, through AutoModelForSequenceClassification and
through label.py's scorer; bad keys and mean pooling are a one-line error and leave no output; a rerun does
nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
from brevity import config, scoring  # noqa: E402
import convert_reward_head  # noqa: E402
from conftest import CHAT_TEMPLATE  # noqa: E402

PROMPTS = ["list three fruits", "give two colors", "the cat sat on the mat"]
RESPONSES = ["apple, pear, plum", "red", "the quick brown fox jumps over the lazy dog and the bird flew"]


class CardRewardModel(torch.nn.Module):
    """The model card's layout: the keys are transformer.* and v_head.weight."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaModel

        self.transformer = LlamaModel(config)
        self.v_head = torch.nn.Linear(config.hidden_size, 1, bias=False)

    @torch.no_grad()
    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
        """The card's reading: v_head on the last hidden state, at the token before the first pad id
        (the last token when there is none). [batch, seq] -> [batch]"""
        values = self.v_head(self.transformer(input_ids, attention_mask=attention_mask).last_hidden_state)[..., 0]
        ends = [int((row == pad_id).nonzero()[0]) if (row == pad_id).any() else len(row) for row in input_ids]
        return torch.stack([values[i, end - 1] for i, end in enumerate(ends)])


@pytest.fixture(scope="module")
def card_model(tiny_tokenizer):
    from transformers import LlamaConfig

    assert tiny_tokenizer.pad_token_id == 0  # the card's PAD_ID
    config = LlamaConfig(vocab_size=-(-len(tiny_tokenizer) // 8) * 8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=tiny_tokenizer.bos_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id)
    config.architectures = ["LlamaForSequenceClassification"]  # the card's class name, as its save would write
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CardRewardModel(config).eval()
        torch.nn.init.normal_(model.v_head.weight, std=1.0)  # rewards well apart from a random `score`
    return model


def save_card_checkpoint(path: Path, model: CardRewardModel, tokenizer, fmt: str, n_shards: int,
                         extra: dict | None = None, drop: str = "") -> Path:
    """The model's state dict as `n_shards` files (safetensors or torch.save .bin) with an index when
    sharded, its config.json and the tokenizer files; `extra` tensors join the last shard."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    model.transformer.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != drop}
    keys = list(state)
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i in range(n_shards):
        part = {k: state[k] for k in keys[i * len(keys) // n_shards:(i + 1) * len(keys) // n_shards]}
        if i == n_shards - 1:
            part.update(extra or {})
        name = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{suffix}" if n_shards > 1 else f"{stem}.{suffix}"
        save_file(part, str(path / name)) if fmt == "safetensors" else torch.save(part, path / name)
        weight_map.update({k: name for k in part})
    if n_shards > 1:
        (path / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def convert(ckpt: Path, out: Path, *flags: str):
    return config.run_main(convert_reward_head.main, (convert_reward_head.Settings,),
                           ["--checkpoint", str(ckpt), "--output_dir", str(out), *flags])


def padded_batch(tokenizer):
    """Right-padded with id 0, as the card pads."""
    seqs = [tokenizer(p + " " + r)["input_ids"] for p, r in zip(PROMPTS, RESPONSES)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("fmt,n_shards", [("safetensors", 2), ("bin", 1), ("bin", 2)])
def test_converted_model_scores_as_the_card_reads_its_reward(tmp_path, card_model, tiny_tokenizer, fmt, n_shards):
    from transformers import AutoModelForSequenceClassification

    ckpt = save_card_checkpoint(tmp_path / "ckpt", card_model, tiny_tokenizer, fmt, n_shards)
    out = convert(ckpt, tmp_path / "out")

    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == n_shards and "score.weight" in index["weight_map"]
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert (model.config.num_labels, model.config.pad_token_id) == (1, 0)
    ids, mask = padded_batch(tiny_tokenizer)
    assert (mask == 0).any()  # the batch really is padded
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(scores, card_model.rewards(ids, mask), rtol=1e-5, atol=1e-5)


def test_label_scorer_gives_the_card_rewards(tmp_path, card_model, tiny_tokenizer):
    """label.py's path: scoring.load_scorer -> RewardModel, through the converted dir's own tokenizer and
    chat template, batched and sorted, equals the card's reward of each conversation alone."""
    out = convert(save_card_checkpoint(tmp_path / "ckpt", card_model, tiny_tokenizer, "safetensors", 2),
                  tmp_path / "out")
    scorer = scoring.load_scorer("", str(out), torch.device("cpu"), torch.float32, batch_size=2)
    assert scorer.tokenizer.chat_template == CHAT_TEMPLATE
    expected = []
    for p, r in zip(PROMPTS, RESPONSES):
        ids = torch.tensor([scorer.encode(p, r)])
        expected.append(float(card_model.rewards(ids, torch.ones_like(ids))[0]))
    assert scorer(PROMPTS, RESPONSES) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_rerun_with_complete_output_does_nothing(tmp_path, card_model, tiny_tokenizer, capsys):
    ckpt = save_card_checkpoint(tmp_path / "ckpt", card_model, tiny_tokenizer, "safetensors", 2)
    out = convert(ckpt, tmp_path / "out")
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    capsys.readouterr()
    convert(ckpt, out)
    assert "already converted" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


@pytest.mark.parametrize("case", ["unknown_key", "missing_v_head"])
def test_bad_checkpoint_is_one_line_error_and_no_output(tmp_path, card_model, tiny_tokenizer, capsys, case):
    if case == "unknown_key":
        ckpt = save_card_checkpoint(tmp_path / "ckpt", card_model, tiny_tokenizer, "safetensors", 2,
                                    extra={"lm_head.weight": torch.zeros(4, 32)})
        names = ["'lm_head.weight'", "model-00002-of-00002.safetensors"]
    else:
        ckpt = save_card_checkpoint(tmp_path / "ckpt", card_model, tiny_tokenizer, "safetensors", 2,
                                    drop="v_head.weight")
        names = ["'v_head.weight'", "model.safetensors.index.json"]
    with pytest.raises(SystemExit) as e:
        convert(ckpt, tmp_path / "out")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(n in err for n in names), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temporary directory left


def test_prefix_map_flag_converts_another_layout(tmp_path, card_model, tiny_tokenizer):
    """--prefix_map: a checkpoint whose backbone is `backbone.` and head `reward_head.`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    card_model.transformer.config.save_pretrained(ckpt)
    tiny_tokenizer.save_pretrained(ckpt)
    state = {k.replace("transformer.", "backbone.", 1).replace("v_head.", "reward_head.", 1): v.contiguous()
             for k, v in card_model.state_dict().items()}
    save_file(state, str(ckpt / "model.safetensors"))
    out = convert(ckpt, tmp_path / "out", "--prefix_map", "backbone.=model.,reward_head.=score.")
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = padded_batch(tiny_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   card_model.rewards(ids, mask), rtol=1e-5, atol=1e-5)


def test_interrupted_conversion_leaves_no_output_and_a_rerun_completes(tmp_path, card_model, tiny_tokenizer,
                                                                         monkeypatch):
    """Stopped while writing the second shard: no output and no temporary copy; what a SIGKILL would leave
    (a hidden temporary directory) is cleared by the next run, which completes."""
    ckpt = save_card_checkpoint(tmp_path / "ckpt", card_model, tiny_tokenizer, "safetensors", 2)
    write_shard, calls = convert_reward_head.write_shard, []

    def stop_on_second(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_shard(tensors, path)

    monkeypatch.setattr(convert_reward_head, "write_shard", stop_on_second)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    (tmp_path / ".out.killed.tmp").mkdir()  # a SIGKILL'd run's temporary directory
    (tmp_path / ".out.killed.tmp" / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    convert(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


OASST_FORMAT = "<|prompter|>{prompt}<|endoftext|><|assistant|>{response}<|endoftext|>"  # as in the recipes


def test_folding_the_head_bias_into_the_norm_bias_adds_it_to_every_score():
    """w·(y + b·w/(w·w)) = w·y + b for any LayerNorm output y: with w = [3, 4] (w·w = 25) and b = 5 the
    shift is [0.6, 0.8]; y = [1, 2] scores 3 + 8 + 5 = 16."""
    folded = convert_reward_head.fold_head_bias(torch.zeros(2), torch.tensor([[3.0, 4.0]]), torch.tensor([5.0]))
    torch.testing.assert_close(folded, torch.tensor([0.6, 0.8]))
    assert float(torch.tensor([3.0, 4.0]) @ (torch.tensor([1.0, 2.0]) + folded)) == pytest.approx(16.0)


@pytest.fixture(scope="module")
def pythia_tokenizer():
    """Pythia's special tokens at Pythia's ids: <|endoftext|> 0 (BOS = EOS = UNK), <|padding|> 1; OASST's
    turn markers; no chat template, no BOS added."""
    import random

    from conftest import WORDS, sentence
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>", "<|prompter|>",
                                                                  "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([sentence(rng, 3, 12) for _ in range(200)] + list(WORDS), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", pad_token="<|padding|>",
                                        clean_up_tokenization_spaces=False)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    return tokenizer


class OasstRewardModel(torch.nn.Module):
    """Open-Assistant's GPTNeoXRewardModel (model/model_training/models/reward_model.py) as its weights name
    it: `gpt_neox` and `out_proj`, with "last" pooling."""

    def __init__(self, config):
        super().__init__()
        from transformers import GPTNeoXModel

        self.gpt_neox = GPTNeoXModel(config)
        self.out_proj = torch.nn.Linear(config.hidden_size, 1)

    @torch.no_grad()
    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """out_proj on the last hidden state at the last position the mask keeps (the first position where
        the mask's running sum reaches its maximum). [batch, seq] -> [batch]"""
        hidden = self.gpt_neox(input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.cumsum(dim=1).argmax(dim=1)
        return self.out_proj(hidden[torch.arange(len(hidden)), last])[:, 0]


OASST_CONFIG = {  # oasst-rm-2.1-pythia-1.4b-epoch-2.5's config.json, sizes shrunk; rotary_pct not the default
    "architectures": ["GPTNeoXRewardModel"], "model_type": "gpt_neox_reward_model", "pooling": "last",
    "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 128, "num_attention_heads": 4,
    "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 0.5, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.28.0.dev0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 304,
}


@pytest.fixture(scope="module")
def oasst_model(pythia_tokenizer):
    from transformers import GPTNeoXConfig

    assert len(pythia_tokenizer) <= OASST_CONFIG["vocab_size"]
    config = GPTNeoXConfig(**{k: v for k, v in OASST_CONFIG.items() if k not in ("architectures", "model_type",
                                                                                  "pooling")})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OasstRewardModel(config).eval()
        norm = model.gpt_neox.final_layer_norm
        torch.nn.init.normal_(norm.weight, mean=1.0, std=0.5)  # a γ and β of their own: the fold must keep them
        torch.nn.init.normal_(norm.bias, std=0.5)
        torch.nn.init.normal_(model.out_proj.weight, std=1.0)
        torch.nn.init.constant_(model.out_proj.bias, 3.0)  # a bias the converted `score` has no place for
    return model


def save_oasst_checkpoint(path: Path, model: OasstRewardModel, tokenizer, config: dict = OASST_CONFIG,
                          fmt: str = "bin") -> Path:
    """As the hub repo holds it: config.json, tokenizer files, one pytorch_model.bin from transformers 4.28,
    whose GPT-NeoX attention also saved its causal mask (`attention.bias`), `attention.masked_bias` and
    rotary `inv_freq` (transformers ignores the first two on load, recomputes the third); or, fmt
    "safetensors", the same tensors in two safetensors shards with an index."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    n_pos = config["max_position_embeddings"]
    rotary_dims = int(config["hidden_size"] // config["num_attention_heads"] * config["rotary_pct"])
    for i in range(config["num_hidden_layers"]):
        prefix = f"gpt_neox.layers.{i}.attention."
        state[prefix + "bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos)
        state[prefix + "masked_bias"] = torch.tensor(-1e9)
        state[prefix + "rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims)
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
        return path
    keys, weight_map = sorted(state), {}
    for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def oasst_ids(tokenizer) -> list[list[int]]:
    seqs = [tokenizer(OASST_FORMAT.format(prompt=p, response=r))["input_ids"] for p, r in zip(PROMPTS, RESPONSES)]
    assert all(s[-1] == tokenizer.eos_token_id for s in seqs)  # each text ends with Pythia's EOS
    return seqs


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_converted_oasst_model_scores_as_gpt_neox_reward_model_with_last_pooling(tmp_path, oasst_model,
                                                                                pythia_tokenizer, fmt):
    """Batched (right-padded) and one by one, the converted GPTNeoXForSequenceClassification gives the
    source model's rewards, its head's bias included."""
    from transformers import AutoModelForSequenceClassification

    out = convert(save_oasst_checkpoint(tmp_path / "ckpt", oasst_model, pythia_tokenizer, fmt=fmt), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["GPTNeoXForSequenceClassification"], "gpt_neox")
    assert "pooling" not in config and "score.bias" not in json.loads((out / "model.safetensors.index.json")
                                                                      .read_text())["weight_map"]
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert (model.config.num_labels, model.config.pad_token_id) == (1, pythia_tokenizer.pad_token_id)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5  # the legacy rotary_pct was read

    seqs = oasst_ids(pythia_tokenizer)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pythia_tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    assert (mask == 0).any()
    expected = oasst_model.rewards(ids, mask)
    assert expected.abs().min() > 0.1  # scores, not zeros that would hide a missing bias
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:, 0], expected,
                                   rtol=1e-5, atol=1e-5)
        for s, value in zip(seqs, expected):
            alone = torch.tensor([s])
            torch.testing.assert_close(model(input_ids=alone).logits[0, 0], value, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(oasst_model.rewards(alone, torch.ones_like(alone))[0], value,
                                       rtol=1e-5, atol=1e-5)


def test_evaluate_scorer_gives_the_oasst_rewards_in_the_recipes_text_format(tmp_path, oasst_model, pythia_tokenizer):
    """evaluate.py's gold scorer (scoring.load_scorer -> RewardModel) with the recipes' --gold_text_format,
    batched and sorted, equals the source model's reward of each text alone."""
    out = convert(save_oasst_checkpoint(tmp_path / "ckpt", oasst_model, pythia_tokenizer), tmp_path / "out")
    scorer = scoring.load_scorer("", str(out), torch.device("cpu"), torch.float32, batch_size=2,
                                text_format=OASST_FORMAT)
    expected = []
    for s in oasst_ids(pythia_tokenizer):
        ids = torch.tensor([s])
        expected.append(float(oasst_model.rewards(ids, torch.ones_like(ids))[0]))
    assert scorer(PROMPTS, RESPONSES) == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("case", ["mean_pooling", "pad_is_eos"])
def test_what_transformers_cannot_read_as_oasst_reads_it_is_a_one_line_error(tmp_path, oasst_model,
                                                                              pythia_tokenizer, capsys, case):
    """Mean pooling averages every token, which no transformers classifier does; a pad id equal to EOS
    would read OASST's texts, which end with EOS, one token early."""
    if case == "mean_pooling":
        ckpt = save_oasst_checkpoint(tmp_path / "ckpt", oasst_model, pythia_tokenizer, {**OASST_CONFIG,
                                                                                       "pooling": "mean"})
        names = ["config.json", "pooling 'mean'"]
    else:
        ckpt = save_oasst_checkpoint(tmp_path / "ckpt", oasst_model, pythia_tokenizer)
        tokenizer_config = json.loads((ckpt / "tokenizer_config.json").read_text())
        (ckpt / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "pad_token": "<|endoftext|>"}))
        names = ["--pad_token_id", "'<|endoftext|>'"]
    with pytest.raises(SystemExit) as e:
        convert(ckpt, tmp_path / "out")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(n in err for n in names), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
