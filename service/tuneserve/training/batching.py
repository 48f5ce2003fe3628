"""Which rows go in which batch, epoch by epoch: deterministic from the seed and the epoch,
so a run resumed from a checkpoint sees exactly the batches it would have seen.

Length grouping: rows are shuffled, cut into mega-batches of 64 batches, sorted by length
inside each, cut into batches, and the batches shuffled. Each batch then holds rows of
similar length, so padding to the batch's longest row wastes little, while the order stays
random enough for SGD (the scheme of HF's LengthGroupedSampler)."""

from __future__ import annotations

import random
from collections.abc import Sequence

MEGA_BATCH = 64


def epoch_batches(
    lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    mega = batch_size * MEGA_BATCH
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
