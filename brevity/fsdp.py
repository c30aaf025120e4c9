"""The policy as a trainable module: `wrap_policy` shards it with FSDP2 under torchrun and leaves it
whole on one process; the helpers here are no-ops on one process, so a training loop's other lines
are the same on one process or many.
"""
from __future__ import annotations

import copy

import torch

from brevity.config import UserError
from brevity.dist import Dist
from brevity.logprobs import SequenceLogps
from brevity.models import autocast_dtype


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (the classes in its `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"{type(model).__name__}: cannot find its decoder layers (no _no_split_modules)")
    return layers


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class ComputeCopy:
    """What a one-process policy with float32 weights runs when it computes in bfloat16: a copy of
    `master` whose parameters are in `dtype` (its buffers, such as rotary frequencies, stay as they
    are). `module()` casts the master weights into it, as autocast casts them at every forward (an
    optimizer step, a loaded checkpoint or a reference sync may have changed them since, and a
    fused optimizer step moves no version counter to tell); backward adds each of its gradients, in
    float32, into the master's `.grad` as soon as it is made. The arithmetic of FSDP2's
    MixedPrecisionPolicy(param_dtype=bfloat16) on several GPUs: bfloat16 activations between the
    matrix multiplies, where autocast keeps float32 ones and casts them at every multiply (on CPU
    those casts are a good part of a step's time: BENCHMARKS.md).
    """

    def __init__(self, master: torch.nn.Module, dtype: torch.dtype):
        lowered = {id(p): torch.nn.Parameter(p.detach().to(dtype), p.requires_grad) for p in master.parameters()}
        self._module = copy.deepcopy(master, memo=lowered)  # the memo: parameters lowered, tied ones still tied
        self._pairs = list(zip(master.parameters(), self._module.parameters(), strict=True))
        for kept, lowered_param in self._pairs:
            if kept.requires_grad:
                lowered_param.register_post_accumulate_grad_hook(_adds_into(kept))

    @torch.no_grad()
    def module(self) -> torch.nn.Module:
        """The copy, its weights the master's as they are now."""
        for kept, lowered in self._pairs:
            lowered.copy_(kept)
        return self._module


def _adds_into(master: torch.nn.Parameter):
    def hook(param: torch.nn.Parameter) -> None:
        if master.grad is None:
            master.grad = param.grad.to(master.dtype)
        else:  # in place, each element widened exactly: no float32 temporary of the whole gradient
            master.grad.add_(param.grad)
        param.grad = None

    return hook


def wrap_policy(model, d: Dist, chunk_size: int = 1024, activation_checkpointing: bool = False,
                compute_dtype: torch.dtype | None = None, torch_compile: bool = False) -> SequenceLogps:
    """`model` on d.device, wrapped for training, its matrix multiplies in `compute_dtype` (None: the
    parameters' dtype). Mixed precision keeps the parameters, gradients and optimizer state in their
    own dtype (float32: the master weights) and only computes in bfloat16: one process, with a
    bfloat16 copy of the model (`ComputeCopy`); several on GPU, by FSDP2's MixedPrecisionPolicy (bf16
    parameters gathered, fp32 gradient reduction), the same arithmetic; several on CPU, by autocast
    in `SequenceLogps`. Under torchrun, `fully_shard` on every decoder layer, then on the wrapper as
    the root (embeddings, final norm, LM head). With `torch_compile`, each layer's forward is
    compiled (the layers share one graph; FSDP2's hooks, on the module, stay outside it), and
    activation checkpointing wraps the compiled forward, so its recompute runs compiled code too: a
    checkpoint inside the compiled code would make dynamo break the graph at any Python side effect
    in the layer (such as the attention hook of `kernels`, which transformers 5.25 installs).

    The model stays in eval mode: dropout is off while training, so the policy's log-probs are the
    same function the reference log-probs were computed with.
    """
    model.to(d.device).eval()
    weights = next(model.parameters()).dtype
    lower = autocast_dtype(weights, compute_dtype or weights)
    runs = ComputeCopy(model, lower) if d.world_size == 1 and lower is not None else None
    for layer in decoder_layers(runs.module() if runs else model):  # wrapped in place: the names stay as they are
        if torch_compile:
            layer.forward = torch.compile(layer.forward, dynamic=True)
        if activation_checkpointing:
            layer.forward = _checkpointed(layer.forward)
    fsdp_casts = d.world_size > 1 and d.device.type == "cuda" and lower is not None
    policy = SequenceLogps(model, chunk_size, None if fsdp_casts or runs else lower, runs)
    if d.world_size == 1:
        return policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=lower, reduce_dtype=torch.float32) if fsdp_casts else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    return policy


def set_gradient_sync(policy, enabled: bool) -> None:
    """FSDP2 reduce-scatters gradients only on the last micro-step of a step; no-op on one process."""
    if hasattr(policy, "set_requires_gradient_sync"):
        policy.set_requires_gradient_sync(enabled)


def clip_grad_norm(policy, max_norm: float) -> float:
    """Clip the global gradient norm (0: do not clip) and return it (before clipping)."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
