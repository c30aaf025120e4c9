"""The data order: length-bucketed global batches that depend only on (lengths, seed, epoch), cut
into each process's micro-batches, so a run on any number of processes sees the same batches.
"""
from __future__ import annotations

import random


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket_batches: int) -> list[list[int]]:
    """One epoch's global batches of example indices: a function of (lengths, seed, epoch) only, so
    every process, and a run on any number of processes, sees the same batches.

    The epoch is shuffled and cut into windows of `bucket_batches` batches; each window is sorted by
    length and cut into batches (a batch holds similar lengths, so padding stays small), and the
    batch order is shuffled. Each batch comes out sorted by length. A last partial batch is dropped.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[: len(order) // batch_size * batch_size]
    window = batch_size * max(1, bucket_batches)
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def global_batches(lengths: list[int], batch_size: int, seed: int, bucket_batches: int, start_step: int,
                   total_steps: int):
    """Yield (step, global batch) for steps start_step .. total_steps - 1, cycling through epochs."""
    per_epoch = len(lengths) // batch_size
    batches = None
    for step in range(start_step, total_steps):
        epoch, i = divmod(step, per_epoch)
        if batches is None or i == 0:
            batches = epoch_batches(lengths, batch_size, seed, epoch, bucket_batches)
        yield step, batches[i]


def micro_batches(batch: list[int], world_size: int, rank: int, grad_accum: int) -> list[list[int]]:
    """This process's micro-batches of a (length-sorted) global batch, one per micro-step: the batch
    is cut into world_size x grad_accum contiguous pieces and micro-step a of rank r takes piece
    a * world_size + r, so the processes of one micro-step get similar lengths."""
    size = len(batch) // (world_size * grad_accum)
    pieces = [batch[i * size:(i + 1) * size] for i in range(world_size * grad_accum)]
    return [pieces[a * world_size + rank] for a in range(grad_accum)]
