"""Reading a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
into per-layer matrices for `lora_batch.MultiLora`, checked against the base model first.

The config is parsed by peft itself (`LoraConfig`, with peft's defaults: a missing
`lora_alpha` is 8), then every value the service relies on is checked, since peft's
dataclass checks almost no types (`r: true` would be rank 1, `lora_alpha: "abc"` a crash
at the first forward). Every field of peft's LoraConfig is sorted into one of three sets
below: used here, harmless for serving, or refused because the batched forward
(`lora_batch`) does not compute what peft computes with it. A field this server has not
reviewed (a newer peft's) is refused as soon as it is set, so a new LoRA variant is never
served as plain LoRA.

peft's conventions, read here: keys `base_model.model.<module>.lora_A.weight` and
`.lora_B.weight` (for an embedding `.lora_embedding_A` and `.lora_embedding_B`); the scaling
is alpha / r, or alpha / sqrt(r) with use_rslora, where `rank_pattern` and `alpha_pattern`
may give a module its own r and alpha (matched by peft's own `get_pattern_key`). The
matrices must have the rank peft would give them. Anything the batched forward cannot apply
is refused with the reason, never half-served."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tuneserve.errors import FailedPrecondition, shown
from tuneserve.inference.lora_batch import LoraPair, base_layers, layer_features
from tuneserve.vocabulary import MAX_LORA_ALPHA

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 4096  # far above any useful LoRA; a bound on what one adapter may allocate
MAX_CONFIG_BYTES = 1 << 20

# Fields the parser reads and checks (below, in `_check_values`).
USED = frozenset(
    {
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "init_lora_weights",
        "bias",
    }
)
# Fields that do not change what a loaded adapter computes.
HARMLESS = frozenset(
    {
        # metadata
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        # which layers got a LoRA when it was made: the weights file says which did
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        # peft sets it from the layer type (GPT-2's Conv1D: true); it changes how peft
        # would merge the matrices, not the matrices or x @ A^T @ B^T
        "fan_in_fan_out",
        # initialisation settings, read only with their init_lora_weights value (checked)
        "loftq_config",
        "eva_config",
        "corda_config",
        "astra_config",
        "lora_ga_config",
        # read only with megatron_config or use_qalora (refused)
        "megatron_core",
        "qalora_group_size",
        # runtime only; peft drops it from a saved config
        "runtime_config",
        # VeLoRA changes only the backward pass: its forward is LoRA's, and the projection
        # it saves beside each pair (lora_velora_embed) is used in training only
        "velora_config",
    }
)
# Fields that make peft compute something the batched forward does not: refused when set.
REFUSED = {
    "use_dora": "uses DoRA (a learned magnitude per output)",
    "alora_invocation_tokens": "is an activated LoRA (aLoRA): it applies only from its "
    "invocation tokens on, and the batched forward applies a LoRA to every token",
    "use_qalora": "uses QALoRA (inputs pooled in groups, for GPTQ-quantized models)",
    "monteclora_config": "uses MonteCLoRA (sampled LoRA weights)",
    "use_bdlora": "uses block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "routes between several LoRA experts (Arrow)",
    "kasa_config": "uses KaSA (learned singular values between A and B, on a truncated "
    "base weight)",
    "lora_bias": "trains LoRA biases",
    "layer_replication": "replicates layers",
    "modules_to_save": "saves whole modules (modules_to_save)",
    "trainable_token_indices": "trains the embeddings of chosen tokens (trainable_token_indices)",
    "target_parameters": "adapts parameters rather than layers (target_parameters)",
    "megatron_config": "was made for Megatron's parallel layers (megatron_config)",
    "ensure_weight_tying": "ties the output layer's LoRA to the embedding's "
    "(ensure_weight_tying), which the batched forward applies separately",
}
# init_lora_weights values: these only choose the starting matrices...
PLAIN_INITS = frozenset({True, False, "gaussian", "orthogonal", "eva", "nora", "mica"})
# ...these also change the base model's weights, which this server serves unchanged.
MAX_PATTERN_CHARS = 1024
_BASE_CHANGING_INIT = re.compile(r"^(pissa.*|olora|corda|astra|lora_ga|loftq)$")

_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(embedding_)?([AB])(?:\.weight)?$")
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(.+)\.base_layer\.weight$")
_VELORA_STATE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_velora_embed$")


class ConfigError(ValueError):
    """adapter_config.json cannot be served as it is; the message names the field."""


def read_config(directory: Path) -> LoraConfig:
    """The adapter's config as peft reads it, every value checked: a LoRA adapter for text
    generation that the batched forward computes exactly as peft would. ConfigError
    otherwise. Never touches the network (peft's from_pretrained would try the Hub when the
    file is missing)."""
    path = directory / CONFIG_FILE
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        raw = json.loads(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{CONFIG_FILE} cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{CONFIG_FILE} is not JSON ({shown(str(e), 80)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{CONFIG_FILE} holds a {type(raw).__name__}, not an object")
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"peft_type is {shown(raw.get('peft_type'))}; only LORA adapters")
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    kwargs = {}
    for key, value in raw.items():
        if key in known and (key in USED or key in HARMLESS or key in REFUSED):
            kwargs[key] = value
        elif value:  # peft would drop it, or peft has it but it is not reviewed
            raise ConfigError(
                f"{shown(key)} is a setting this server does not know; it may change what "
                "the adapter computes"
            )
    kwargs.pop("runtime_config", None)  # as peft's from_json_file does
    for key in ("target_modules", "exclude_modules"):
        _check_names(key, kwargs.get(key))  # before peft makes a set of them
    _check_init(kwargs.get("init_lora_weights", True))
    try:
        config = LoraConfig.from_peft_type(**kwargs)
    except Exception as e:  # whatever peft's parser raises: the file is bad
        raise ConfigError(
            f"peft cannot read it ({type(e).__name__}: {shown(str(e), 120)})"
        ) from None
    _check_values(config)
    return config


def read_lora(
    adapter_id: str, directory: Path, model: nn.Module, *, field: str = "adapter_id"
) -> dict[str, LoraPair]:
    """The adapter's matrices by module name, each checked against the base layer; the
    model is only read. Anything amiss is a FailedPrecondition on `field` ("adapter_id"
    when a request names the adapter, "path" when a directory is imported)."""
    subject = f"adapter {adapter_id!r}" if field == "adapter_id" else f"{field}: the adapter"

    def refuse(why: str) -> FailedPrecondition:
        return FailedPrecondition(f"{subject} cannot be served: {why}", field=field)

    try:
        config = read_config(directory)
    except ConfigError as e:
        raise refuse(f"{CONFIG_FILE}: {e}") from None
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise refuse(f"{WEIGHTS_FILE} cannot be read ({e})") from None

    layers = dict(base_layers(model))
    found: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            copy = _BASE_COPY.match(key)
            if copy is not None and _same_as_base(layers.get(copy.group(1)), tensor):
                continue  # peft saves embedding layers whole alongside their LoRA
            if getattr(config, "velora_config", None) and _VELORA_STATE.match(key):
                continue  # VeLoRA's training-time projection (see HARMLESS)
            raise refuse(f"{key} is not a LoRA matrix")
        name = match.group(1)
        if name not in layers:
            raise refuse(f"{key} adapts {name!r}, which the base model does not have")
        found.setdefault(name, {})[match.group(3)] = tensor
        embedding[name] = match.group(2) is not None
    if not found:
        raise refuse(f"{WEIGHTS_FILE} holds no LoRA matrices")

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
        r, alpha = module_rank_and_alpha(config, name)
        if rank != r:
            raise refuse(f"{name}: its matrices have rank {rank}, but {CONFIG_FILE} gives r {r}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise refuse(f"{name}: the matrices hold NaN or infinite values")
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        pairs[name] = LoraPair(a=a, b=b, scaling=scaling)
    return pairs


def module_rank_and_alpha(config: LoraConfig, name: str) -> tuple[int, float]:
    """r and alpha of module `name` as peft gives them (LoraModel._create_and_replace)."""
    ranks, alphas = config.rank_pattern or {}, config.alpha_pattern or {}
    r = ranks.get(get_pattern_key(list(ranks), name), config.r)
    alpha = alphas.get(get_pattern_key(list(alphas), name), config.lora_alpha)
    return int(r), float(alpha)


# --- checks of the config's values


def _check_names(key: str, value: object) -> None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value != "all-linear":
            _check_regex(key, value)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} is {shown(value)}; it must be a name, a regex or a list of names")


PATTERN_CHECK_TIMEOUT_S = 2.0
_MATCH_ALL = """
import json, re, sys
keys, names = json.load(sys.stdin)
for key in keys:
    for name in names:
        re.match(rf"(.*\\.)?({key})$", name)
"""


def check_patterns_finish(
    config: LoraConfig, names: Sequence[str], *, timeout_s: float = PATTERN_CHECK_TIMEOUT_S
) -> None:
    """Match every rank_pattern and alpha_pattern key against every module name, as peft's
    get_pattern_key will, in a plain Python child killed after `timeout_s`. Python's `re`
    cannot be interrupted and holds the GIL: a catastrophically backtracking pattern (say
    `(\\w|\\w)*z`) matched in the server would freeze all of it. (The `regex` engine
    is no stand-in: it finishes such patterns quickly where `re` never does.)"""
    keys = [*(config.rank_pattern or {}), *(config.alpha_pattern or {})]
    if not keys:
        return
    try:
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", _MATCH_ALL],
            input=json.dumps([keys, list(names)]),
            text=True,
            capture_output=True,
            timeout=timeout_s,
            check=True,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            "rank_pattern/alpha_pattern: a pattern takes too long to match the model's "
            "module names (catastrophic backtracking)"
        ) from None
    except subprocess.CalledProcessError as e:
        raise ConfigError(
            f"rank_pattern/alpha_pattern: cannot be matched ({shown(e.stderr[-200:], 200)})"
        ) from None


def _check_regex(key: str, pattern: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(f"{key}: a pattern of over {MAX_PATTERN_CHARS} characters")
    try:
        re.compile(rf"(.*\.)?({pattern})$")  # how peft matches pattern keys
    except re.error as e:
        raise ConfigError(f"{key}: {shown(pattern)} is not a regular expression ({e})") from None


def _check_init(init: object) -> None:
    if isinstance(init, str) and _BASE_CHANGING_INIT.match(init):
        raise ConfigError(
            f"init_lora_weights is {init!r}, which changes the base model's weights as well; "
            "this server serves its base model unchanged (convert the adapter to plain LoRA "
            "first: peft's save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    if not (isinstance(init, bool | str) and init in PLAIN_INITS):
        raise ConfigError(f"init_lora_weights is {shown(init)}, which this server does not know")


def _check_rank(key: str, r: object) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise ConfigError(f"{key} is {shown(r)}; it must be a whole number from 1 to {MAX_RANK}")


def _check_alpha(key: str, alpha: object) -> None:
    ok = isinstance(alpha, int | float) and not isinstance(alpha, bool)
    if not ok or not 0 < alpha <= MAX_LORA_ALPHA:  # type: ignore[operator]  # False for NaN
        raise ConfigError(
            f"{key} is {shown(alpha)}; it must be a number above 0 and at most {MAX_LORA_ALPHA:g}"
        )


def _check_pattern(key: str, pattern: object, check: Any) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, dict):
        raise ConfigError(f"{key} is {shown(pattern)}; it must map module names to values")
    for name, value in pattern.items():
        _check_regex(key, name)
        check(f"{key}[{shown(name)}]", value)


def _check_values(config: LoraConfig) -> None:
    """peft's defaults filled in; peft's own checks passed. Everything else."""
    if config.task_type not in (None, "CAUSAL_LM"):
        raise ConfigError(f"task_type is {config.task_type}; only CAUSAL_LM adapters generate")
    _check_rank("r", config.r)
    _check_alpha("lora_alpha", config.lora_alpha)
    _check_pattern("rank_pattern", config.rank_pattern, _check_rank)
    _check_pattern("alpha_pattern", config.alpha_pattern, _check_alpha)
    dropout = config.lora_dropout
    if not (isinstance(dropout, int | float) and not isinstance(dropout, bool)) or not (
        0 <= dropout < 1
    ):
        raise ConfigError(f"lora_dropout is {shown(dropout)}; it must be a number in [0, 1)")
    if not isinstance(config.use_rslora, bool):
        raise ConfigError(f"use_rslora is {shown(config.use_rslora)}; it must be true or false")
    if config.bias in ("all", "lora_only"):
        raise ConfigError(
            f"bias is {config.bias!r}: the adapter trains the base model's biases, which "
            "the batched forward does not implement"
        )
    if config.bias != "none":
        raise ConfigError(f'bias is {shown(config.bias)}; it must be "none"')
    for key, why in REFUSED.items():
        # set means true, as peft decides whether a variant is active (resolve_lora_variant)
        if getattr(config, key, None):
            raise ConfigError(f"the adapter {why}, which the batched forward does not implement")


def _same_as_base(layer: nn.Module | None, tensor: torch.Tensor) -> bool:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != tensor.shape:
        return False
    return torch.equal(tensor.to(device=weight.device, dtype=weight.dtype), weight)
