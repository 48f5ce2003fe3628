"""tuneserve.inference.params: sampling parameter checks and defaults."""

from __future__ import annotations

import struct

import pytest

from tuneserve.errors import InvalidArgument, InvalidArguments
from tuneserve.inference.params import SamplingParams, resolve_params


def resolve(p: SamplingParams) -> SamplingParams:
    return resolve_params(p, default_max_new_tokens=64, max_new_tokens=256)


def test_defaults_are_filled_in() -> None:
    out = resolve(SamplingParams())
    assert out.max_new_tokens == 64
    assert out.temperature == 1.0
    assert out.top_p == 1.0
    assert not out.greedy
    assert out.stop == ()


def test_a_seed_is_picked_when_none_is_given() -> None:
    seeds = {resolve(SamplingParams()).seed for _ in range(5)}
    assert None not in seeds
    assert all(0 <= s < 2**63 for s in seeds)  # type: ignore[operator]
    assert len(seeds) > 1  # picked at random, so a retry samples differently


def test_given_values_are_kept() -> None:
    p = SamplingParams(
        max_new_tokens=256, temperature=0.7, top_k=40, top_p=0.9, seed=0, stop=("\n",)
    )
    out = resolve(p)
    assert (out.max_new_tokens, out.temperature, out.top_k, out.top_p) == (256, 0.7, 40, 0.9)
    assert out.seed == 0
    assert out.stop == ("\n",)


def test_temperature_zero_means_greedy() -> None:
    assert resolve(SamplingParams(temperature=0.0)).greedy
    assert resolve(SamplingParams(greedy=True)).greedy
    assert not resolve(SamplingParams(temperature=0.5)).greedy


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(max_new_tokens=257), "parameters.max_new_tokens"),
        (SamplingParams(max_new_tokens=-1), "parameters.max_new_tokens"),
        (SamplingParams(temperature=-0.1), "parameters.temperature"),
        (SamplingParams(temperature=float("nan")), "parameters.temperature"),
        (SamplingParams(top_k=-1), "parameters.top_k"),
        (SamplingParams(top_p=0.0), "parameters.top_p"),
        (SamplingParams(top_p=1.5), "parameters.top_p"),
        (SamplingParams(repetition_penalty=0.0), "parameters.repetition_penalty"),
        (SamplingParams(no_repeat_ngram_size=-1), "parameters.no_repeat_ngram_size"),
        (SamplingParams(seed=-1), "parameters.seed"),
        (SamplingParams(seed=2**63), "parameters.seed"),
        # numbers that overflow the scores, and floats that are not numbers (issue 18)
        (SamplingParams(temperature=1e-40), "parameters.temperature"),
        (SamplingParams(temperature=0.005), "parameters.temperature"),
        (SamplingParams(temperature=float("inf")), "parameters.temperature"),
        (SamplingParams(greedy=True, temperature=float("nan")), "parameters.temperature"),
        (SamplingParams(repetition_penalty=1e-40), "parameters.repetition_penalty"),
        (SamplingParams(repetition_penalty=float("nan")), "parameters.repetition_penalty"),
        (SamplingParams(repetition_penalty=float("inf")), "parameters.repetition_penalty"),
        (SamplingParams(top_p=float("nan")), "parameters.top_p"),
        (SamplingParams(top_p=float("-inf")), "parameters.top_p"),
        (SamplingParams(seed=2**64 - 1), "parameters.seed"),
        (SamplingParams(stop=("a",) * 17), "parameters.stop"),
        (SamplingParams(stop=("ok", "")), "parameters.stop[1]"),
        (SamplingParams(stop=("x" * 257,)), "parameters.stop[0]"),
    ],
)
def test_each_bad_field_is_named(params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve(params)
    assert info.value.field == field
    assert field in info.value.message


def test_every_bad_field_is_reported_at_once() -> None:
    p = SamplingParams(max_new_tokens=1000, temperature=101, top_p=0, stop=("", "ok", ""))
    with pytest.raises(InvalidArguments) as info:
        resolve(p)
    assert [q.field for q in info.value.problems] == [
        "parameters.max_new_tokens",
        "parameters.temperature",
        "parameters.top_p",
        "parameters.stop[0]",
        "parameters.stop[2]",
    ]
    assert "limit of 256" in info.value.message


def test_limits_are_inclusive() -> None:
    out = resolve(SamplingParams(max_new_tokens=256, temperature=100, top_p=1.0, seed=2**63 - 1))
    assert out.max_new_tokens == 256
    low = resolve(SamplingParams(temperature=0.01, repetition_penalty=0.01, seed=0))
    assert (low.temperature, low.repetition_penalty, low.greedy) == (0.01, 0.01, False)
    assert resolve(SamplingParams(repetition_penalty=100)).repetition_penalty == 100


def test_the_floors_sent_as_float32_are_accepted() -> None:
    """The API's temperature and repetition_penalty are float32: 0.01 arrives as
    0.0099999998, a hair under the floor it is."""
    (floor,) = struct.unpack("f", struct.pack("f", 0.01))
    assert floor < 0.01
    out = resolve(SamplingParams(temperature=floor, repetition_penalty=floor))
    assert (out.temperature, out.repetition_penalty) == (floor, floor)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        (SamplingParams(seed=2**64 - 1), "is not between 0 and 2**63-1 (9223372036854775807)"),
        (SamplingParams(seed=-1), "is not between 0 and 2**63-1"),
        (SamplingParams(temperature=1e-40), "for greedy decoding use 0"),
        (SamplingParams(temperature=float("nan")), "nan is not a finite number"),
        (SamplingParams(repetition_penalty=1e-40), "is not in [0.01, 100]"),
        (SamplingParams(repetition_penalty=float("inf")), "inf is not a finite number"),
        (SamplingParams(max_new_tokens=-1), "-1 is negative"),
    ],
)
def test_a_refusal_states_the_range_or_what_is_wrong(params: SamplingParams, says: str) -> None:
    """The message tells the caller what to send instead: the seed's range (the API's
    field is a uint64, half of which is refused), the way to greedy decoding."""
    with pytest.raises(InvalidArgument) as info:
        resolve(params)
    assert says in info.value.message
