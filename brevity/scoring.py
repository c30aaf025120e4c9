"""Scoring: a reward or gold scorer is a Python function or a sequence-classification reward model,
both called as `scorer(prompts, responses) -> list[float]` (label.py and evaluate.py), a batch at
a time (`score_batches`). A function's scores are checked: n real numbers, not strings or bools.
"""
from __future__ import annotations

import importlib
import importlib.util
import numbers
import os
import sys
from pathlib import Path

import torch

from brevity.config import UserError
from brevity.models import autocast, load_model, load_tokenizer
from brevity.tokens import pad_batch, prompt_messages, prompt_user_text


def load_function(spec: str, what: str):
    """The function named by "module:function" (importable from the working directory or this
    repository) or "path/to/file.py:function"."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise UserError(f"{what} {spec!r}: expected module:function")
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise UserError(f"{what} {spec!r}: {module_name} not found")
    try:
        if module_name.endswith(".py"):
            # registered under a name of its own before it runs: a dataclass in it looks its module up there
            loader = importlib.util.spec_from_file_location(f"_scorer_{Path(module_name).stem}", module_name)
            module = importlib.util.module_from_spec(loader)
            sys.modules[loader.name] = module
            loader.loader.exec_module(module)
        else:
            for path in (os.getcwd(), str(Path(__file__).resolve().parents[1])):
                if path not in sys.path:
                    sys.path.append(path)
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what} {spec!r}: cannot import {module_name} ({e})")
    except SyntaxError as e:
        raise UserError(f"{what} {spec!r}: {e.filename}:{e.lineno}: {e.msg}")
    except Exception as e:  # the module's own code failed while it was imported
        raise UserError(f"{what} {spec!r}: importing {module_name} raised {_one_line(e)}")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{what} {spec!r}: {module_name} has no function {name!r}")
    return fn


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def as_scores(values, n: int, name: str) -> list[float]:
    """A scorer's return value as n floats: a list, tuple, NumPy array or tensor of n real numbers.
    None, a single number, a numeric string or a bool is refused, not converted (float() takes "3" and True)."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # an array or a tensor
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{name}: returned {type(values).__name__} {str(values)[:40]}, not a list of {n} scores")
    if len(values) != n:
        raise UserError(f"{name}: returned {len(values)} scores for {n} responses")
    for k, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise UserError(f"{name}: score {k + 1} of a batch is {v!r} ({type(v).__name__}), not a number")
    try:
        return [float(v) for v in values]
    except OverflowError:  # an integer past the float range
        raise UserError(f"{name}: a score is too large for a float") from None


def score_batches(scorer, prompts: list, responses: list[str], batch_size: int, on_batch=None,
                  kept: str = "") -> list[float]:
    """`scorer` on `batch_size` responses at a time; `on_batch(start, scores)` after each. A function
    that raises or returns something else than scores is a UserError naming it, the batch and, if
    there were batches before it, `kept` (what became of their scores)."""
    scores, batches = [], -(-len(responses) // batch_size)
    for start in range(0, len(responses), batch_size):
        end = min(start + batch_size, len(responses))
        try:
            batch = scorer(prompts[start:end], responses[start:end])
        except UserError as e:  # a function that raised, or returned something else than scores
            where = f"batch {start // batch_size + 1} of {batches}, responses {start + 1}-{end}"
            raise UserError(f"{e}; in {where}" + (f"; {kept}" if kept and start else "")) from None
        if on_batch:
            on_batch(start, batch)
        scores += batch
    return scores


class RewardModel:
    """A reward model: `AutoModelForSequenceClassification` with one label, called as
    `rm(prompts, responses) -> list[float]`.

    It reads each (prompt, response) as its own tokenizer formats it (never the policy's ids): the
    conversation through its chat template, else `text_format` ("{prompt}" and "{response}"
    filled in; a backslash-n in it is a newline, so that flags and recipe files can carry one),
    else the tokenizer's pair encoding. Batches are sorted by length and right-padded with an id
    that occurs in none of the batch's sequences, set as the model's pad id for the call:
    transformers reads the score at the last token that is not the pad id, so it is read at the
    last real token even where the real pad id is EOS and ends a sequence. A sequence longer
    than `max_length` (0: no limit) loses tokens from the left. Float32 weights (`dtype`) compute in
    `compute_dtype` by autocast (None: in float32).
    """

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, batch_size: int = 16,
                 max_length: int = 0, text_format: str = "", trust_remote_code: bool = False,
                 compute_dtype: torch.dtype | None = None):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(name, trust_remote_code)
        self.model = load_model(name, dtype, trust_remote_code, AutoModelForSequenceClassification).to(device)
        if self.model.config.num_labels != 1:
            raise UserError(f"{name}: reward model has num_labels={self.model.config.num_labels}, expected 1")
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.precision = (dtype, compute_dtype or dtype)
        self.text_format = text_format.replace("\\n", "\n")

    def encode(self, prompt, response: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) and not self.text_format:
            messages = prompt_messages(prompt) + [{"role": "assistant", "content": response}]
            ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        elif self.text_format:
            try:
                text = self.text_format.format(prompt=prompt_user_text(prompt), response=response)
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"text format {self.text_format!r}: only {{prompt}} and {{response}} may be in "
                                f"braces ({type(e).__name__}: {e})") from None
            ids = tok(text)["input_ids"]
        else:
            ids = tok(prompt_user_text(prompt), response)["input_ids"]
        return ids[-self.max_length:] if self.max_length else ids

    @torch.inference_mode()
    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        config = self.model.config.get_text_config()
        own_pad, vocab = config.pad_token_id, self.model.get_input_embeddings().num_embeddings
        scores = [0.0] * len(seqs)
        try:
            for start in range(0, len(order), self.batch_size):
                batch = [seqs[i] for i in order[start:start + self.batch_size]]
                used = {t for s in batch for t in s}
                config.pad_token_id = own_pad if own_pad is not None and own_pad not in used else next(
                    t for t in range(vocab) if t not in used)
                ids, mask, _ = pad_batch(batch, [[] for _ in batch], config.pad_token_id)
                with autocast(self.device, *self.precision):
                    logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for i, value in zip(order[start:start + self.batch_size], logits[:, 0].float().tolist()):
                    scores[i] = value
        finally:
            config.pad_token_id = own_pad
        return scores


def load_scorer(reward_fn: str, reward_model: str, device: torch.device, dtype: torch.dtype, batch_size: int = 16,
                max_length: int = 0, text_format: str = "", trust_remote_code: bool = False, flag: str = "reward",
                compute_dtype: torch.dtype | None = None):
    """`scorer(prompts, responses) -> list[float]` from exactly one of a function spec and a model.

    A function gets the user prompt text (`prompt_user_text`) and the response text; a reward model
    gets the whole prompt (chat messages included)."""
    if bool(reward_fn) == bool(reward_model):
        raise UserError(f"give exactly one of --{flag}_fn module:function and --{flag}_model DIR_OR_HUB_ID")
    if reward_model:
        return RewardModel(reward_model, device, dtype, batch_size, max_length, text_format, trust_remote_code,
                           compute_dtype)
    fn, name = load_function(reward_fn, f"--{flag}_fn"), f"--{flag}_fn {reward_fn}"

    def score(prompts: list, responses: list[str]) -> list[float]:
        try:
            values = fn([prompt_user_text(p) for p in prompts], list(responses))
        except Exception as e:  # the user's function failed: name it, not our stack
            raise UserError(f"{name} raised {_one_line(e)}") from None
        return as_scores(values, len(responses), name)

    return score
