"""examples/convert_reward_head.py: a reward model in Starling-RM-34B's model-card layout (`transformer` =
LlamaModel, `v_head` = Linear(hidden, 1, bias=False), reward at the token before the first pad id 0),
converted, scores exactly as the card's model does, through AutoModelForSequenceClassification and
through label.py's scorer; bad keys are a one-line error and leave no output; a rerun does nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import common  # noqa: E402
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
    return common.run_main(convert_reward_head.main, (convert_reward_head.Settings,),
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
    """label.py's path: common.load_scorer -> RewardModel, through the converted dir's own tokenizer and
    chat template, batched and sorted, equals the card's reward of each conversation alone."""
    out = convert(save_card_checkpoint(tmp_path / "ckpt", card_model, tiny_tokenizer, "safetensors", 2),
                  tmp_path / "out")
    scorer = common.load_scorer("", str(out), torch.device("cpu"), torch.float32, batch_size=2)
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
