"""Tokenization. A prompt is a string or a list of chat messages; a response is a string or a
one-message list (TRL's conversational preference format). The prompt is encoded once, the response
separately, and the sequence is their concatenation: chosen and rejected share the very same prompt
ids, and no token can straddle the boundary, so the response mask is exact.

A response ends with the token(s) the chat template ends an assistant turn with (`end_of_turn_ids`:
ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>), the ones sampling stops on; a
tokenizer without a template ends it with its EOS. What the template writes after that token (ChatML's
"\n") is never sampled, so it is not trained on either.
"""
from __future__ import annotations

import hashlib
import json
import typing

import torch

from brevity.config import UserError


def prompt_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def response_text(response) -> str:
    """The text of a response given as a string or as a list of messages (the assistant's turn)."""
    if isinstance(response, str):
        return response
    if isinstance(response, list) and response and isinstance(response[-1], dict):
        return response[-1].get("content", "")
    raise UserError(f"response must be a string or a list of messages, got {type(response).__name__}")


def prompt_user_text(prompt) -> str:
    """The last user message of a prompt (what a reward function reads as the instruction)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def format_prompt(tokenizer, prompt) -> str:
    """The text the model is conditioned on: the chat template with a generation prompt if the
    tokenizer has one, else the plain prompt string."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise UserError("prompt given as chat messages but the tokenizer has no chat template")
    return prompt


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """The ids the model is conditioned on, per prompt (`format_prompt`), in one tokenizer call. The
    chat template already holds any BOS it wants; a plain prompt gets the tokenizer's specials."""
    if not prompts:
        return []
    texts = [format_prompt(tokenizer, p) for p in prompts]
    return tokenizer(texts, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def assistant_turn_end(tokenizer) -> str:
    """The text the chat template writes after an assistant message's content (ChatML: "<|im_end|>\n")."""
    marker = "\x00ASSISTANT-CONTENT\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    return text[text.rindex(marker) + len(marker):]


def special_ids(tokenizer) -> set[int]:
    """Every special token: the named ones (bos, eos, ...) and added tokens flagged special, such as a
    chat template's markers (<|im_start|>), which all_special_ids leaves out."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def end_of_turn_ids(tokenizer) -> list[int]:
    """What a response ends with: the special tokens the chat template writes after an assistant
    message (ChatML: [<|im_end|>]; the "\n" after it is text, left out), or the tokenizer's EOS when
    the template writes none or there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        return [tokenizer.eos_token_id]
    special = special_ids(tokenizer)
    ids = [i for i in tokenizer(assistant_turn_end(tokenizer), add_special_tokens=False)["input_ids"] if i in special]
    return ids or [tokenizer.eos_token_id]


def encode_responses(tokenizer, responses) -> list[list[int]]:
    """Response token ids followed by the end of turn (`end_of_turn_ids`), per response, in one call."""
    if not responses:
        return []
    ids = tokenizer([response_text(r) for r in responses], add_special_tokens=False)["input_ids"]
    end = end_of_turn_ids(tokenizer)
    return [x + end for x in ids]


def padding_id(tokenizer) -> int:
    """The id padded positions get: the pad token, else the EOS. Padding is masked out of attention and
    of every loss, so any id does; the tokenizer itself is left as it is (no pad token is invented,
    which would change the tokenizer_config every saved model carries)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def vocab_sha256(tokenizer) -> str:
    """A fingerprint of the token -> id map: two tokenizers with the same one read the same ids as the
    same tokens, so sampled ids carried in a file may be trained on as they are."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()).hexdigest()


def fit_to_length(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
                  truncate_responses: bool):
    """(prompt, responses, prompt_was_cut, responses_were_cut), or None to drop the example.

    A prompt longer than max_prompt_length loses tokens from the left. A response that would pass
    max_length is cut on the right if truncate_responses, else the example is dropped (a cut
    response has no EOS: training on it teaches the model not to stop).
    """
    prompt_cut = len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_length - len(prompt)
    responses_cut = any(len(r) > room for r in responses)
    if responses_cut:
        if not truncate_responses:
            return None
        responses = [r[:room] for r in responses]
    return prompt, responses, prompt_cut, responses_cut


def pad_batch(sequences: list[list[int]], response_masks: list[list[int]], pad_id: int):
    """Right-pad token lists into `input_ids`, `attention_mask`, `response_mask`, each [B, T] long."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids)
    for i, (seq, mask) in enumerate(zip(sequences, response_masks)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        resp[i, : len(mask)] = torch.tensor(mask)
    return ids, attn, resp


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device=None):
    """Right-padded `input_ids`, `attention_mask`, `response_mask` [B, T] for (prompt ids, response
    ids) pairs; the response mask is 1 exactly on the response's ids."""
    ids, attn, resp = pad_batch([p + r for p, r in examples], [[0] * len(p) + [1] * len(r) for p, r in examples],
                                pad_id)
    return ids.to(device), attn.to(device), resp.to(device)


class ResponseBatch(typing.NamedTuple):
    """Decoder inputs and where the response tokens are in them.

    input_ids [B, T]; attention_mask [B, T] (1 on tokens) or [B, 1, T, T] bool (True: may attend);
    position_ids [B, T] or None (0, 1, 2, ... in every row). For each of the N response tokens whose
    log-prob is taken: `source`, the flat index into [B * T] of the hidden state that predicts it;
    `target`, the flat index of the token; `owner`, its sequence (0 .. sequences - 1); `column`, its
    index among its sequence's scored response tokens.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    source: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor
    column: torch.Tensor
    sequences: int


def collate_pairs(triples: list[tuple[list[int], list[int], list[int]]], pad_id: int, device=None) -> ResponseBatch:
    """B (prompt ids, chosen ids, rejected ids) triples as 2B sequences (chosen ones, then rejected ones)
    in B rows: the prompt once, the chosen response, the rejected one, padding. The prompt goes through
    the model once for both, and the rows are as long as prompt + chosen + rejected, where two
    sequences per pair (`collate`) pad both to the batch's longest prompt + response.

    A rejected token has the position it would have right after the prompt, and the mask is causal
    except that rejected tokens do not see chosen ones, so every hidden state is the one its own
    (prompt, response) sequence gives; the prompt's last hidden state predicts both responses' first
    tokens. As in `collate`, nothing predicts a response's first token after an empty prompt.
    """
    n, width = len(triples), max(len(p) + len(c) + len(r) for p, c, r in triples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.arange(width).repeat(n, 1)
    part = torch.full((n, width), 3)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    source, target, owner, column = [], [], [], []
    for b, (p, c, r) in enumerate(triples):
        P, C, R, row, first = len(p), len(c), len(r), b * width, 0 if p else 1
        ids[b, :P + C + R] = torch.tensor(p + c + r)
        part[b, :P], part[b, P:P + C], part[b, P + C:P + C + R] = 0, 1, 2
        positions[b, P + C:P + C + R] -= C
        source += [row + P - 1 + j for j in range(first, C)]
        source += [row + (P - 1 if j == 0 else P + C + j - 1) for j in range(first, R)]
        target += [row + P + j for j in range(first, C)] + [row + P + C + j for j in range(first, R)]
        owner += [b] * (C - first) + [n + b] * (R - first)
        column += list(range(C - first)) + list(range(R - first))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & ~((part.unsqueeze(2) == 2) & (part.unsqueeze(1) == 1))
    index = (torch.tensor(v, dtype=torch.long) for v in (source, target, owner, column))
    return ResponseBatch(*(t.to(device) for t in (ids, mask.unsqueeze(1), positions, *index)), sequences=2 * n)
