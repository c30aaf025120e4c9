"""Generation: what sample.py and evaluate.py share. A response is sampled from its own seeded noise
stream, so it depends on (seed, prompt index, sample index) and the model, not on which other
prompts share its batch or process. `GenerationSettings` holds every sampling knob: a new knob is
one field here plus the place that uses it.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing

import torch

from brevity.config import UserError, setting
from brevity.models import COMPUTE_DTYPE_HELP, autocast, compute_dtype
from brevity.tokens import end_of_turn_ids, padding_id


@dataclasses.dataclass
class GenerationSettings:
    """The sampling knobs of sample.py and evaluate.py (their settings dataclasses extend this one)."""
    max_new_tokens: int = setting(256, "response tokens at most; a response cut here gets finish_reason 'length'")
    temperature: float = setting(1.0, "sampling temperature; 0 is greedy")
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    seed: int = setting(0, "response j to prompt i is sampled with noise seeded by (seed, i, j)")
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "model dtype; auto: the compute dtype (float32 weights compute in --compute_dtype by autocast)")
    compute_dtype: typing.Literal["auto", "float32", "bfloat16"] = setting("auto", COMPUTE_DTYPE_HELP)
    batch_size: int = setting(32, "sequences decoded together on each process")


SAME_OUTPUT = ("batch_size",)  # generation settings that do not change what is sampled


def check_generation_settings(g: GenerationSettings) -> None:
    if g.max_new_tokens < 1 or g.batch_size < 1:
        raise UserError(f"need --max_new_tokens >= 1 and --batch_size >= 1 (got {g.max_new_tokens}, {g.batch_size})")
    if not (g.temperature >= 0 and 0 < g.top_p <= 1):  # written so that NaN fails too
        raise UserError(f"need --temperature >= 0 and 0 < --top_p <= 1 (got {g.temperature}, {g.top_p})")


def sampling_key(g: GenerationSettings) -> dict:
    """The generation settings that decide what is sampled (all but SAME_OUTPUT): two runs that agree
    on these draw the same responses from the same model and prompts."""
    return {f.name: getattr(g, f.name) for f in dataclasses.fields(GenerationSettings) if f.name not in SAME_OUTPUT}


_MASK64, _GOLDEN = (1 << 64) - 1, 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int: a well-mixed 64-bit hash."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def response_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The noise stream of response `sample_index` to prompt `prompt_index` (as a signed int64)."""
    return _signed(_mix64(_mix64(_mix64(seed + _GOLDEN) + prompt_index) + sample_index))


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def stream_gumbel(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab] (float64): element (b, v) is a hash of (seeds[b], step, v), so
    row b's noise is the same whatever the batch around it, on any device.

    `_mix64`'s arithmetic on int64 tensors (multiplication wraps; right shifts made logical by a
    mask), done in place in one [B, vocab] buffer and one scratch: the same bits as the
    out-of-place formula (tests/test_sample.py) without its temporaries."""
    counter = (step << 24) + torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = seeds.unsqueeze(1) + (counter * _signed(_GOLDEN)).unsqueeze(0)
    shifted = torch.empty_like(x)

    def xor_shifted_right(k: int) -> None:  # x ^= x >>> k, a logical shift: the sign bits masked off
        torch.bitwise_right_shift(x, k, out=shifted)
        x.bitwise_xor_(shifted.bitwise_and_((1 << (64 - k)) - 1))

    xor_shifted_right(30)
    x *= _signed(_MIX1)
    xor_shifted_right(27)
    x *= _signed(_MIX2)
    xor_shifted_right(31)
    x >>= 11
    u = x.bitwise_and_((1 << 53) - 1).double().add_(0.5).div_(2.0**53)  # in (0, 1)
    return u.log_().neg_().log_().neg_()


NOISE_ELEMENTS = 1 << 18  # the noise of this many (row, token) pairs at once: two 2 MiB int64 buffers


class SeededSampler:
    """Picks each row's next token: argmax(logits / T + g) with g ~ Gumbel(0, 1) from the row's own
    stream (Gumbel-max: a draw from softmax(logits / T)); top-p removes the tail first; temperature 0
    is greedy. `sampler(logits [b, V], step, rows) -> token ids [b]`, where `rows` (a list of b
    indices into `seeds`) names the rows still in the batch.
    """

    def __init__(self, seeds: torch.Tensor, temperature: float, top_p: float = 1.0):
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p

    def __call__(self, logits: torch.Tensor, step: int, rows: list[int] | None = None) -> torch.Tensor:
        logits = logits.float()
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_p < 1.0:  # keep the smallest set of top tokens whose mass reaches top_p
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= self.top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        seeds = (self.seeds if rows is None else self.seeds[rows]).to(logits.device)
        # On CPU a few rows at a time, so that the noise's dozen in-place passes stay in cache: 1.7
        # times as fast as one [B, V] buffer for SmolLM2's vocabulary (BENCHMARKS.md); the same sums.
        # On GPU the whole batch at once (every chunk costs kernel launches).
        vocab = logits.shape[-1]
        chunk = max(1, NOISE_ELEMENTS // vocab) if logits.device.type == "cpu" else max(1, len(seeds))
        return torch.cat([stream_gumbel(seeds[i:i + chunk], step, vocab).add_(logits[i:i + chunk]).argmax(-1)
                          for i in range(0, len(seeds), chunk)])


def stop_token_ids(model, tokenizer) -> list[int]:
    """What ends a response: the chat template's end of an assistant turn (`end_of_turn_ids`, what
    responses are trained to end with), the tokenizer's EOS and the model's generation config's eos ids."""
    ids = {tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(ids)


def preallocated_kv_cache(config, capacity: int):
    """A DynamicCache whose full-attention layers write each step's keys and values in place into
    buffers of `capacity` positions and hand attention views of the filled part. DynamicLayer
    instead grows by `torch.cat`, copying the whole cache of every layer at every step (on CPU, with
    a fresh allocation each time, the largest single cost of sampling). Same values, same tokens.
    Sliding-window and other layer kinds stay as transformers makes them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)  # device (and dtype in some 5.x), flag
                self.key_buffer = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[3]))
                self.value_buffer = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[3]))
                self.keys = self.key_buffer[:, :, :0]
            start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:  # rows leave the batch
            if self.is_initialized:
                end = self.keys.shape[2]
                self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _forward_kwargs(model) -> dict:
    """What a decoder's forward is called with besides its inputs: the cache's keyword (`cache` from
    transformers 5.2x, `past_key_values` before) and, where it has one, logits for the last position only."""
    params = inspect.signature(model.forward).parameters
    return {"cache_key": "cache" if "cache" in params else "past_key_values",
            "logits_to_keep": {"logits_to_keep": 1} if "logits_to_keep" in params else {}}


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampler, max_new_tokens: int,
           stops: list[int]) -> list[list[int]]:
    """Each row's new tokens, up to and including its first stop id, from a left-padded batch.

    The decode loop `generate` runs (one forward over the prompts, then one token per step on the
    cache, positions counted from each row's first real token), with one change: a row that emits a
    stop id leaves the batch, cache included, so the remaining steps cost only the rows still
    running. transformers' `generate` keeps every row to the end of the longest, feeding pad tokens.
    """
    kw = _forward_kwargs(model)
    rows, width = input_ids.shape
    device = input_ids.device
    cache = preallocated_kv_cache(model.config, width + max_new_tokens)
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, max_new_tokens)], 1)  # every step's columns
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    live, stop_set = list(range(rows)), set(stops)  # the input row of each row still in the batch
    tokens: list[list[int]] = [[] for _ in range(rows)]
    inputs = input_ids
    for step in range(max_new_tokens):
        logits = model(input_ids=inputs, attention_mask=mask[:, :width + step], position_ids=positions,
                       use_cache=True, **{kw["cache_key"]: cache}, **kw["logits_to_keep"]).logits[:, -1]
        chosen = sampler(logits, step, live)
        keep = []
        for k, (row, token) in enumerate(zip(live, chosen.tolist())):  # the step's one device sync
            tokens[row].append(token)
            if token not in stop_set:
                keep.append(k)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(live):
            live = [live[k] for k in keep]
            keep = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep)
            mask, chosen, positions = mask[keep], chosen[keep], positions[keep]
        inputs, positions = chosen.unsqueeze(1), positions[:, -1:] + 1
    return tokens


@torch.inference_mode()
def generate_responses(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], g: GenerationSettings,
                       desc: str | None = None) -> list[dict]:
    """One response per prompt (repeat a prompt for several), in input order:
    {"text", "token_ids" (the stop token included if emitted), "num_tokens", "finish_reason": "eos" |
    "length"}. The text is the tokens decoded as they are, special tokens included, less the final stop
    token (`stop_token_ids`).

    Prompts are sorted by length (longest first: memory trouble shows at once) and left-padded into
    batches of `g.batch_size`, so a batch holds similar lengths; `decode` runs each batch, dropping
    rows as they finish. temperature 0 is greedy; otherwise row i samples from stream `seeds[i]`
    (`SeededSampler`). The model's own generation config (its temperature, penalties) is not used.
    Float32 weights compute in `g.compute_dtype` by autocast (`brevity.models.autocast`).
    """
    from tqdm.auto import tqdm

    device, weights = next(model.parameters()).device, next(model.parameters()).dtype
    compute = compute_dtype(g.compute_dtype, device.type)
    stops = stop_token_ids(model, tokenizer)
    pad_id = padding_id(tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    batches = [order[i:i + g.batch_size] for i in range(0, len(order), g.batch_size)]
    out: list[dict | None] = [None] * len(prompt_ids)
    off = {} if desc else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE
    for batch in tqdm(batches, desc=desc, dynamic_ncols=True, **off):
        width = max(len(prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            mask[row, width - len(prompt_ids[i]):] = 1
        sampler = SeededSampler(torch.tensor([seeds[i] for i in batch]), g.temperature, g.top_p)
        with autocast(device, weights, compute):
            generated = decode(model, ids.to(device), mask.to(device), sampler, g.max_new_tokens, stops)
        for row, i in enumerate(batch):
            tokens = generated[row]
            ended = tokens[-1] in stops
            # Verbatim: a special token inside a response (<|im_start|> where the turn should have ended)
            # stays in its text, so the labeller and a re-encoding see what was sampled
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
            out[i] = {"text": text, "token_ids": tokens, "num_tokens": len(tokens),
                      "finish_reason": "eos" if ended else "length"}
    return out
