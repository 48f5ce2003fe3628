"""tuneserve.jobs.model: spec validation, adapter id rules and serialisation."""

from __future__ import annotations

import json

import pytest

from tuneserve.errors import InvalidArgument, InvalidArguments
from tuneserve.jobs.model import (
    DatasetFormat,
    JobSpec,
    JobState,
    LoraSpec,
    Progress,
    TrainingSpec,
    check_adapter_id,
)


def spec(**overrides: object) -> JobSpec:
    values: dict[str, object] = {
        "base_model": "gpt2",
        "adapter_id": "vader",
        "dataset_format": DatasetFormat.PROMPT_RESPONSE,
        "dataset_rows": 3,
    }
    values.update(overrides)
    return JobSpec(**values)  # type: ignore[arg-type]


def test_valid_spec_resolves_alpha_to_twice_r() -> None:
    out = spec(lora=LoraSpec(r=16)).validate()
    assert out.lora.alpha == 32.0
    assert spec(lora=LoraSpec(r=4, alpha=3.0)).validate().lora.alpha == 3.0


def test_validate_collects_several_problems_at_once() -> None:
    bad = spec(
        adapter_id="Bad/Id",
        lora=LoraSpec(r=0, dropout=1.0, target_modules=("q_proj", "bad name!")),
        training=TrainingSpec(learning_rate=2.0, max_seq_length=4, batch_size=0),
        request_id="x" * 129,
    )
    with pytest.raises(InvalidArguments) as info:
        bad.validate()
    fields = [p.field for p in info.value.problems]
    assert set(fields) == {
        "adapter_id",
        "lora.r",
        "lora.dropout",
        "lora.target_modules[1]",
        "training.learning_rate",
        "training.max_seq_length",
        "training.batch_size",
        "request_id",
    }
    assert all(isinstance(p, InvalidArgument) for p in info.value.problems)
    assert info.value.field == fields[0]


def test_a_single_problem_is_raised_alone_with_its_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        spec(training=TrainingSpec(epochs=0)).validate()
    assert not isinstance(info.value, InvalidArguments)
    assert info.value.field == "training.epochs"


@pytest.mark.parametrize("adapter_id", ["vader", "a", "0", "v1.2_x-y", "a" * 63, "a.b"])
def test_good_adapter_ids(adapter_id: str) -> None:
    assert check_adapter_id(adapter_id) == adapter_id
    spec(adapter_id=adapter_id).validate()


@pytest.mark.parametrize(
    "adapter_id",
    ["", "a/b", "/abs", "..", "a..b", "../x", "Vader", "vADER", "a" * 64, "-a", ".a", "_a",
     "a b", "a\\b", "caf\u00e9"],
)  # fmt: skip
def test_bad_adapter_ids(adapter_id: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_adapter_id(adapter_id)
    assert info.value.field == "adapter_id"
    with pytest.raises(InvalidArgument):
        spec(adapter_id=adapter_id).validate()


def test_adapter_id_error_names_the_given_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_adapter_id("A", field_name="adapter")
    assert info.value.field == "adapter"


def test_to_dict_from_dict_round_trip_through_json() -> None:
    original = spec(
        lora=LoraSpec(r=4, alpha=8.0, dropout=0.1, target_modules=("c_attn", "c_proj")),
        training=TrainingSpec(epochs=2, max_steps=7, batch_size=2, seed=5, warmup_steps=1),
        request_id="req-1",
    )
    again = JobSpec.from_dict(json.loads(json.dumps(original.to_dict())))
    assert again == original
    assert isinstance(again.lora.target_modules, tuple)
    assert again.dataset_format is DatasetFormat.PROMPT_RESPONSE


def test_round_trip_keeps_unset_warmup() -> None:
    original = spec()
    again = JobSpec.from_dict(json.loads(json.dumps(original.to_dict())))
    assert again.training.warmup_steps is None
    assert again == original


def test_final_states() -> None:
    assert {s for s in JobState if s.final} == {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
    }


def test_fraction_done() -> None:
    assert Progress().fraction_done == 0.0
    assert Progress(step=3, total_steps=12).fraction_done == 0.25


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lora": LoraSpec(alpha=float("inf"))}, "lora.alpha"),
        ({"lora": LoraSpec(alpha=float("nan"))}, "lora.alpha"),
        ({"lora": LoraSpec(alpha=1e9)}, "lora.alpha"),
        ({"lora": LoraSpec(use_dora=True)}, "lora.use_dora"),
        ({"training": TrainingSpec(seed=2**63)}, "training.seed"),
        ({"training": TrainingSpec(seed=2**64 - 1)}, "training.seed"),
        ({"training": TrainingSpec(learning_rate=float("nan"))}, "training.learning_rate"),
        ({"lora": LoraSpec(target_modules=("x",) * 300)}, "lora.target_modules"),
    ],
)
def test_values_that_would_fail_later_are_refused_naming_the_field(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        spec(**overrides).validate()
    assert info.value.field == field


def test_seed_error_states_the_range() -> None:
    with pytest.raises(InvalidArgument) as info:
        spec(training=TrainingSpec(seed=2**63)).validate()
    assert "2**63 - 1" in info.value.message


def test_dora_is_allowed_for_classification() -> None:
    from tuneserve.jobs.model import Task

    spec(lora=LoraSpec(use_dora=True), task=Task.CLASSIFICATION, labels=("a", "b")).validate()


def test_an_over_long_adapter_id_is_cut_in_the_error() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_adapter_id("x" * 20_000)
    assert len(info.value.message) < 400
