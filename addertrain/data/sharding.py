"""Which samples each worker reads in an epoch.

An optimizer step consumes ``group`` micro-steps (gradient accumulation) of ``workers * batch``
samples each: ``group * workers * batch`` samples, the global batch. Every worker runs
``group * ceil(n / global batch)`` micro-steps of full-size batches. Micro-step ``t`` of all
workers together covers the next ``workers * batch`` samples of the epoch's order, so each
optimizer step covers the same samples of the order whatever the number of workers (an
elastic resume continues at the same place) and an epoch reads every sample exactly once.
The last optimizer step splits what is left evenly among its ``group * workers`` batches and
tops each up with samples from the start of the order; ``valid`` counts the real samples at the
front of each batch.
"""

from __future__ import annotations

import numpy as np


def steps_per_epoch(n: int, num_shards: int, batch: int, group: int = 1) -> int:
    return group * -(-n // (group * num_shards * batch))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's sample order; the same on every worker given the same run seed."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def shard_layout(
    order: np.ndarray, num_shards: int, batch: int, shard_id: int, group: int = 1
) -> tuple[np.ndarray, list[int]]:
    """Sample indices (``steps * batch`` of them) for one worker and the valid count per step."""
    n = len(order)
    steps = steps_per_epoch(n, num_shards, batch, group)
    step_size = num_shards * batch
    head = steps - group  # micro-steps before the last optimizer step's
    full = order[: head * step_size].reshape(head, num_shards, batch)[:, shard_id]
    tail = order[head * step_size :]
    slots = group * num_shards
    bounds = [j * len(tail) // slots for j in range(slots + 1)]
    parts, valid = [full.reshape(-1)], [batch] * head
    for micro in range(group):
        j = micro * num_shards + shard_id
        real = tail[bounds[j] : bounds[j + 1]]
        # Padding of the slots before this one comes first, so fillers differ across slots.
        pad_before = j * batch - bounds[j]
        parts += [real, order[(pad_before + np.arange(batch - len(real))) % n]]
        valid.append(len(real))
    return np.concatenate(parts), valid
