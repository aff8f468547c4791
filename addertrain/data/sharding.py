"""Which samples each worker reads in an epoch.

Every worker runs ``steps = ceil(n / (workers * batch))`` steps of full-size batches. Step
``t`` of all workers together covers the next ``workers * batch`` samples of the epoch's
order, so an epoch reads every sample exactly once across workers. The last step splits
what is left evenly among the workers and tops each batch up with samples from the start
of the order; ``valid`` counts the real samples at the front of each batch.
"""

from __future__ import annotations

import numpy as np


def steps_per_epoch(n: int, num_shards: int, batch: int) -> int:
    return -(-n // (num_shards * batch))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's sample order; the same on every worker given the same run seed."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def shard_layout(
    order: np.ndarray, num_shards: int, batch: int, shard_id: int
) -> tuple[np.ndarray, list[int]]:
    """Sample indices (``steps * batch`` of them) for one worker and the valid count per step."""
    n = len(order)
    steps = steps_per_epoch(n, num_shards, batch)
    step_size = num_shards * batch
    full = order[: (steps - 1) * step_size].reshape(steps - 1, num_shards, batch)[:, shard_id]
    tail = order[(steps - 1) * step_size :]
    bounds = [w * len(tail) // num_shards for w in range(num_shards + 1)]
    real = tail[bounds[shard_id] : bounds[shard_id + 1]]
    # Padding of the workers before this one comes first, so fillers differ across workers.
    pad_before = shard_id * batch - bounds[shard_id]
    filler = order[(pad_before + np.arange(batch - len(real))) % n]
    indices = np.concatenate([full.reshape(-1), real, filler])
    return indices, [batch] * (steps - 1) + [len(real)]
