"""tuneserve.training.batching: which rows go in which batch, epoch by epoch."""

from __future__ import annotations

import itertools
import random

import pytest

from tuneserve.training.batching import MEGA_BATCH, epoch_batches


def long_tailed_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts like real datasets: most rows short, a few very long."""
    rng = random.Random(seed)
    return [min(2000, int(8 * rng.paretovariate(1.1))) for _ in range(n)]


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    """Pad tokens when each batch is padded to its longest row."""
    return sum(max(lengths[i] for i in b) - lengths[i] for b in batches for i in b)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_same_seed_and_epoch_give_the_same_batches(group_by_length: bool) -> None:
    lengths = long_tailed_lengths(300)
    kw = {"batch_size": 8, "group_by_length": group_by_length}
    first = epoch_batches(lengths, seed=7, epoch=2, **kw)
    assert epoch_batches(lengths, seed=7, epoch=2, **kw) == first  # a resumed run sees these
    assert epoch_batches(lengths, seed=7, epoch=3, **kw) != first  # each epoch reshuffles
    assert epoch_batches(lengths, seed=8, epoch=2, **kw) != first  # the seed matters


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("n", [1, 7, 8, 100, 8 * MEGA_BATCH + 13])
def test_every_row_appears_exactly_once_per_epoch(group_by_length: bool, n: int) -> None:
    lengths = long_tailed_lengths(n)
    for epoch in range(3):
        batches = epoch_batches(
            lengths, batch_size=8, seed=0, epoch=epoch, group_by_length=group_by_length
        )
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_batches_are_full_but_one_holding_the_remainder(group_by_length: bool) -> None:
    n, batch_size = 8 * MEGA_BATCH + 13, 8  # more than one mega-batch
    batches = epoch_batches(
        long_tailed_lengths(n),
        batch_size=batch_size,
        seed=3,
        epoch=0,
        group_by_length=group_by_length,
    )
    sizes = sorted(len(b) for b in batches)
    assert len(batches) == -(-n // batch_size)
    assert sizes == [n % batch_size] + [batch_size] * (len(batches) - 1)


def test_exact_multiple_gives_only_full_batches() -> None:
    batches = epoch_batches([5] * 32, batch_size=8, seed=0, epoch=0, group_by_length=True)
    assert [len(b) for b in batches] == [8, 8, 8, 8]


def test_no_grouping_is_a_plain_shuffle() -> None:
    lengths = list(range(64))
    batches = epoch_batches(lengths, batch_size=8, seed=0, epoch=0, group_by_length=False)
    assert [i for b in batches for i in b] != list(range(64))  # shuffled, not in order


def test_grouping_puts_rows_of_similar_length_together() -> None:
    lengths = long_tailed_lengths(1000)
    kw = {"batch_size": 8, "seed": 1, "epoch": 0}
    grouped = epoch_batches(lengths, group_by_length=True, **kw)
    plain = epoch_batches(lengths, group_by_length=False, **kw)
    assert padding(grouped, lengths) * 4 < padding(plain, lengths)


def test_within_one_mega_batch_batches_do_not_overlap_in_length() -> None:
    lengths = long_tailed_lengths(200)  # fewer rows than one mega-batch: one sorted chunk
    batches = epoch_batches(lengths, batch_size=8, seed=2, epoch=0, group_by_length=True)
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    for (_, high), (low, _) in itertools.pairwise(spans):
        assert high <= low


def test_grouped_batches_are_still_in_random_order() -> None:
    lengths = list(range(256))  # distinct lengths: a sorted order would be visible
    kw = {"batch_size": 8, "seed": 0, "group_by_length": True}
    batches = epoch_batches(lengths, epoch=0, **kw)
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert epoch_batches(lengths, epoch=1, **kw) != batches
