"""tuneserve.training.flops: the GPU's peak by name and model FLOPs utilisation."""

from __future__ import annotations

import pytest
import torch

from tuneserve.training import flops
from tuneserve.training.flops import model_flops_utilisation, peak_flops


def test_no_peak_on_a_cpu() -> None:
    assert peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
    ],
)
def test_peak_of_a_known_gpu_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, tflops: float
) -> None:
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_has_no_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops(torch.device("cuda", 0)) is None


def test_a_gpu_whose_name_contains_a_known_one_is_not_mistaken_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    assert peak_flops(torch.device("cuda", 0)) is None


def test_mfu_is_six_flops_per_parameter_per_token_over_the_peak() -> None:
    # 1e9 parameters at 10k tokens/s: 6e13 FLOP/s of a 1.2e14 peak is half of it.
    assert model_flops_utilisation(
        parameters=1_000_000_000, tokens_per_second=10_000.0, peak=1.2e14
    ) == pytest.approx(0.5)
    assert model_flops_utilisation(
        parameters=500_000, tokens_per_second=3.0, peak=989e12
    ) == pytest.approx(6 * 500_000 * 3.0 / 989e12)


def test_mfu_is_zero_without_a_peak() -> None:
    assert model_flops_utilisation(parameters=10**9, tokens_per_second=1e4, peak=None) == 0.0
    assert model_flops_utilisation(parameters=10**9, tokens_per_second=1e4, peak=0.0) == 0.0
