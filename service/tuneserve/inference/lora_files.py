"""Reading a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
into per-layer matrices for `lora_batch.MultiLora`, checked against the base model first.

peft's conventions, read here: keys `base_model.model.<module>.lora_A.weight` and
`.lora_B.weight` (for an embedding `.lora_embedding_A` and `.lora_embedding_B`); the scaling
is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, where `alpha_pattern` may give
a module its own alpha and the rank is the matrices' own (so `rank_pattern` needs nothing).
Anything the batched forward cannot apply is refused with the reason, never half-served:
DoRA, LoRA biases, layer replication, modules saved whole (`modules_to_save`), and copies
of base weights that differ from this base model's."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tuneserve.errors import FailedPrecondition
from tuneserve.inference.lora_batch import LoraPair, base_layers, layer_features

_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(embedding_)?([AB])(?:\.weight)?$")
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(.+)\.base_layer\.weight$")
_UNSERVABLE = {
    "use_dora": "uses DoRA",
    "lora_bias": "trains LoRA biases",
    "layer_replication": "replicates layers",
    "modules_to_save": "saves whole modules (modules_to_save)",
}


def read_lora(
    adapter_id: str, directory: Path, model: nn.Module, *, field: str = "adapter_id"
) -> dict[str, LoraPair]:
    """The adapter's matrices by module name, each checked against the base layer; the
    model is only read. Anything amiss is a FailedPrecondition on `field` ("adapter_id"
    when a request names the adapter, "path" when a directory is imported)."""
    subject = f"adapter {adapter_id!r}" if field == "adapter_id" else f"{field}: the adapter"

    def refuse(why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"{subject} cannot be served with other adapters: {why}", field=field
        )

    try:
        config: dict[str, Any] = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise refuse(f"its files cannot be read ({e})") from None
    if not isinstance(config, dict):
        raise refuse("adapter_config.json is not an object")
    if config.get("peft_type") != "LORA":
        raise refuse(f"a {config.get('peft_type')} adapter, not LORA")
    for option, why in _UNSERVABLE.items():
        if config.get(option):
            raise refuse(why)
    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    layers = dict(base_layers(model))
    found: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            copy = _BASE_COPY.match(key)
            if copy is not None and _same_as_base(layers.get(copy.group(1)), tensor):
                continue  # peft saves embedding layers whole alongside their LoRA
            raise refuse(f"{key} is not a LoRA matrix")
        name = match.group(1)
        if name not in layers:
            raise refuse(f"{key} adapts {name!r}, which the base model does not have")
        found.setdefault(name, {})[match.group(3)] = tensor
        embedding[name] = match.group(2) is not None
    if not found:
        raise refuse("adapter_model.safetensors holds no LoRA matrices")

    pairs = {}
    for name, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise refuse(f"{name} has lora_{next(iter(ab))} without its pair")
        layer = layers[name]
        try:
            in_dim, out_dim = layer_features(layer)
        except TypeError as e:
            raise refuse(f"{name}: {e}") from None
        if embedding[name] != isinstance(layer, nn.Embedding):
            raise refuse(f"{name}: embedding LoRA on a non-embedding layer, or the reverse")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (rank, in_dim) or b.shape != (out_dim, rank):
            raise refuse(
                f"{name}: A {list(a.shape)} and B {list(b.shape)} do not fit a layer of "
                f"{in_dim} in and {out_dim} out"
            )
        if rank < 1:
            raise refuse(f"{name}: rank {rank}; a LoRA has rank 1 or more")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise refuse(f"{name}: the matrices hold NaN or infinite values")
        scale = _alpha_for(name, alpha_pattern, alpha)
        scaling = scale / math.sqrt(rank) if rslora else scale / rank
        pairs[name] = LoraPair(a=a, b=b, scaling=scaling)
    return pairs


def _alpha_for(name: str, pattern: dict[str, float], default: float) -> float:
    """peft's rule: a pattern key names the module, or a dotted suffix of its name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value)
    return default


def _same_as_base(layer: nn.Module | None, tensor: torch.Tensor) -> bool:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != tensor.shape:
        return False
    return torch.equal(tensor.to(device=weight.device, dtype=weight.dtype), weight)
