"""Tokenization. A prompt is a string or a list of chat messages; a response is a string or a
one-message list (TRL's conversational preference format). The prompt is encoded once, the response
separately, and the sequence is their concatenation: chosen and rejected share the very same prompt
ids, and no token can straddle the boundary, so the response mask is exact.
"""
from __future__ import annotations

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


def encode_responses(tokenizer, responses) -> list[list[int]]:
    """Response token ids followed by EOS (the model is trained to stop), per response, in one call."""
    if not responses:
        return []
    ids = tokenizer([response_text(r) for r in responses], add_special_tokens=False)["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids]


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
