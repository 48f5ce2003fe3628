"""tuneserve.inference.params: sampling parameter checks and defaults."""

from __future__ import annotations

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
