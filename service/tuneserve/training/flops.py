"""Model FLOPs utilisation: the share of the GPU's peak that training turns into model math.

Uses the usual estimate of 6 FLOPs per parameter per token (forward and backward), against
the dense bf16 peak of the GPU by name. With a frozen base, LoRA skips the base weights'
gradients, so the true work is nearer 4N; 6N keeps the figure comparable with the usual MFU
reports. On a CPU or an unknown GPU it is not reported."""

from __future__ import annotations

import re

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, SXM parts where there are two).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    words = set(re.split(r"[\s-]+", torch.cuda.get_device_name(device)))
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in words:  # whole words: an "L40" is not an "L4"
            return tflops * 1e12
    return None


def model_flops_utilisation(
    *, parameters: int, tokens_per_second: float, peak: float | None
) -> float:
    return 6.0 * parameters * tokens_per_second / peak if peak else 0.0
