"""Response log-probabilities, per sequence (logp(y) = sum over response tokens of log pi(y_t | x, y_<t))
or per token, in float32, computed chunk by chunk so that no [B, T, V] float32 tensor exists.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from brevity.dist import all_reduce_sum
from brevity.tokens import ResponseBatch, collate, collate_pairs


def _chunk_token_logps(lm_head, hidden, targets, sum_sq: bool = False):
    # float32 before the log-softmax: autocast leaves a log-softmax of bfloat16 logits in bfloat16 on
    # CPU. log_softmax is one fused kernel each way; logit[target] - logsumexp(logits), the same value,
    # makes [N, V] temporaries for its max subtraction and exp on CPU and is slower.
    all_logps = lm_head(hidden).float().log_softmax(-1)
    logps = all_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not sum_sq:
        return logps
    with torch.no_grad():  # log sum_v p_v^2 = logsumexp_v(2 log p_v); WPO's, no gradient
        return logps, (2 * all_logps).logsumexp(-1)


def _chunked_logps(lm_head, hidden, targets, chunk_size: int, checkpoint_chunks: bool, sum_sq: bool = False):
    """`_chunk_token_logps` over the positions (dim -2) of [B, T, H] or [N, H] hidden states, a chunk
    at a time. Under autograd each chunk's logits are recomputed in backward (activation
    checkpointing), so only one chunk's logits are ever alive. With `sum_sq`, a pair of tensors."""
    from torch.utils.checkpoint import checkpoint

    dim = hidden.dim() - 2
    one_chunk = functools.partial(_chunk_token_logps, sum_sq=sum_sq)
    out = []
    for start in range(0, hidden.shape[dim], chunk_size):
        width = min(chunk_size, hidden.shape[dim] - start)
        h, t = hidden.narrow(dim, start, width), targets.narrow(dim, start, width)
        if checkpoint_chunks:
            out.append(checkpoint(one_chunk, lm_head, h, t, use_reentrant=False))
        else:
            out.append(one_chunk(lm_head, h, t))
    if not out:
        empty = hidden.new_zeros(targets.shape, dtype=torch.float32)
        return (empty, empty) if sum_sq else empty
    return tuple(torch.cat(parts, dim=dim) for parts in zip(*out)) if sum_sq else torch.cat(out, dim=dim)


def response_batch(input_ids, attention_mask, response_mask) -> ResponseBatch:
    """`collate`'s right-padded rows as a `ResponseBatch`: one sequence per row, position t predicting
    token t + 1 wherever that token is a response token."""
    predicts = response_mask[:, 1:].bool()
    rows, width = input_ids.shape
    flat = torch.arange(rows * width, device=input_ids.device).view(rows, width)[:, :-1]
    owner = torch.arange(rows, device=input_ids.device).unsqueeze(1).expand_as(predicts)
    return ResponseBatch(input_ids, attention_mask, None, flat[predicts], flat[predicts] + 1, owner[predicts],
                         (predicts.cumsum(1) - 1)[predicts], rows)


def _packed_response_logps(model, batch: ResponseBatch, chunk_size: int, sum_sq: bool = False):
    """(log-probs of the batch's N response tokens [N], in the order of `batch.source`; with `sum_sq`
    also log sum_v p_v^2 at each, else None).

    The LM head runs only on the hidden states that predict a response token: they are packed into
    [N, H] and go through the head `chunk_size` tokens at a time, so prompt and padding positions
    cost no LM-head work and the peak is chunk_size x V floats.
    """
    mask = batch.attention_mask
    if mask.dim() == 2 and bool((mask[:, :-1] >= mask[:, 1:]).all()):
        # Right padding: under the causal mask no real token sees a pad, so the plain causal mask
        # gives the real positions the same values, and attention can skip the blocks above the
        # diagonal instead of reading an explicit [B, T, T] mask everywhere.
        mask = None
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                                 use_cache=False).last_hidden_state
    out = _chunked_logps(model.get_output_embeddings(), hidden.flatten(0, 1)[batch.source],
                         batch.input_ids.flatten()[batch.target], chunk_size, torch.is_grad_enabled(), sum_sq)
    return out if sum_sq else (out, None)


def sequence_logps(model, batch: ResponseBatch, chunk_size: int = 1024):
    """Sum of response-token log-probs per sequence, float32 [batch.sequences]."""
    logps, _ = _packed_response_logps(model, batch, chunk_size)
    return logps.new_zeros(batch.sequences).index_add(0, batch.owner, logps)


def token_logps(model, batch: ResponseBatch, chunk_size: int = 1024, sum_sq: bool = False):
    """Response-token log-probs per token, float32 [batch.sequences, R] (R: the longest response): column t
    is the response's t-th token (EOS included), zeros past its end. With `sum_sq`, also log sum_v
    pi(v | x, y_<t)^2 at each token, [S, R] without gradient (WPO's weights): a pair of tensors."""
    logps, log_sum_sq = _packed_response_logps(model, batch, chunk_size, sum_sq)
    shape = (batch.sequences, int(batch.column.max()) + 1 if batch.column.numel() else 0)

    def unpack(values):
        return values.new_zeros(shape).index_put((batch.owner, batch.column), values)

    return (unpack(logps), unpack(log_sum_sq)) if sum_sq else unpack(logps)


class SequenceLogps(torch.nn.Module):
    """A causal LM whose forward returns per-sequence response log-probs, float32 [S]
    (`sequence_logps`), or with `per_token` per-token ones [S, R] (`token_logps`, and its `sum_sq`),
    under autocast to `autocast_dtype` when given (the matrix multiplies and attention in that dtype,
    the log-softmax and the sums in float32). With `compute_copy` (`brevity.fsdp.ComputeCopy`), the
    forward runs that lower-precision copy of `model`, and the gradients reach `model`'s parameters.

    Why a module: `sequence_logps` calls the decoder and the LM head directly, never the LM's own
    forward, so under FSDP2 the LM's root parameters (embeddings, final norm, LM head) must belong
    to a module whose forward does run, for its hooks to gather them: this one, sharded as the root.
    """

    def __init__(self, model, chunk_size: int = 1024, autocast_dtype: torch.dtype | None = None, compute_copy=None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast_dtype
        self.compute_copy = compute_copy  # not a module: parameters() and state_dict() are the model's alone

    def forward(self, *batch, per_token: bool = False, sum_sq: bool = False):
        """`batch`: `collate`'s (input_ids, attention_mask, response_mask), or one `ResponseBatch`."""
        batch = batch[0] if len(batch) == 1 else response_batch(*batch)
        autocast = (torch.autocast(batch.input_ids.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        model = self.compute_copy.module() if self.compute_copy else self.model
        with autocast:
            if per_token:
                return token_logps(model, batch, chunk_size=self.chunk_size, sum_sq=sum_sq)
            return sequence_logps(model, batch, chunk_size=self.chunk_size)


@torch.no_grad()
def response_logps(policy: SequenceLogps, examples: list[tuple[list[int], ...]], batch_size: int, pad_id: int,
                   d=None, per_token: bool = False) -> torch.Tensor:
    """logp(response | prompt) of every (prompt ids, response ids) example, float32 [N] on CPU; with
    `per_token`, the log-prob of every response token instead, float32 [sum of the response lengths]:
    example after example, each response's tokens in order. Examples given as (prompt ids, chosen
    ids, rejected ids) triples go through the model as `collate_pairs` rows, the prompt once for both,
    and count as their chosen examples followed by their rejected ones ([2N], or every chosen token
    then every rejected token).

    Batches of `batch_size` examples sorted by length. With `d` (a `dist.Dist` of several processes)
    the examples are split over the processes and every process gets all values; under FSDP every
    process must run every forward, so one without a share of the last group recomputes an example
    of it. Without `d`, this process computes them all.
    """
    rank, world = (d.rank, d.world_size) if d else (0, 1)
    device = next(policy.parameters()).device
    paired = bool(examples) and len(examples[0]) == 3
    responses = [e[1] for e in examples] + ([e[2] for e in examples] if paired else [])
    order = sorted(range(len(examples)), key=lambda i: sum(len(part) for part in examples[i]))
    lengths = torch.tensor([len(r) for r in responses]) if per_token else torch.ones(len(responses), dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    total, count = torch.zeros(int(lengths.sum())), torch.zeros(len(responses))
    group = batch_size * world
    for start in range(0, len(order), group):
        ids = order[start:start + group][rank * batch_size:(rank + 1) * batch_size] or order[start:start + 1]
        batch = ([collate_pairs([examples[i] for i in ids], pad_id, device)] if paired
                 else collate([examples[i] for i in ids], pad_id, device))
        values = policy(*batch, per_token=per_token).float().cpu()
        outputs = ids + [len(examples) + i for i in ids] if paired else ids
        if per_token:
            for row, k in enumerate(outputs):
                total[starts[k]:starts[k] + lengths[k]] += values[row, :lengths[k]]
        else:
            total[outputs] += values
        count[outputs] += 1
    if world > 1:
        # A forward without backward leaves FSDP2's root parameters gathered and registered in place
        # of the sharded ones; put the sharded ones back (what an optimizer must hold).
        policy.reshard()
        total, count = all_reduce_sum(d, total.to(device)).cpu(), all_reduce_sum(d, count.to(device)).cpu()
    return total / count.repeat_interleave(lengths)
