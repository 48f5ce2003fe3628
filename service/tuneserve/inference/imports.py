"""ImportAdapter: register a user's existing PEFT LoRA adapter directory, read from an
allowed root, once it is shown to fit the base model. Only safetensors weights are read
(never pickles); the files are copied into the registry, so the source may change or go."""

from __future__ import annotations

import shutil
from collections.abc import Callable

from tuneserve.config import ServerConfig
from tuneserve.data.rows import resolve_under_roots
from tuneserve.errors import AlreadyExists, InvalidArgument
from tuneserve.inference.adapters import read_lora_config
from tuneserve.jobs.model import check_adapter_id
from tuneserve.registry import AdapterInfo, AdapterRegistry

FILES = ("adapter_config.json", "adapter_model.safetensors")


def import_adapter(
    config: ServerConfig,
    registry: AdapterRegistry,
    path: str,
    adapter_id: str,
    *,
    check_fits: Callable[[str, str], None],
) -> AdapterInfo:
    """`check_fits(adapter_id, directory)` raises unless the weights there load onto the
    base model (the engine's own load check, where the model lives)."""
    check_adapter_id(adapter_id)
    if registry.exists(adapter_id):
        raise AlreadyExists(f"adapter {adapter_id!r} already exists", field="adapter_id")
    source = resolve_under_roots(
        path,
        config.adapter_import_roots,
        field="path",
        what="adapter",
        flag="--adapter-import-roots",
        directory=True,
    )
    lora = read_lora_config(source)
    if not (source / "adapter_model.safetensors").is_file():
        raise InvalidArgument(
            "path: no adapter_model.safetensors there (pickled .bin weights are refused)",
            field="path",
        )
    check_fits(adapter_id, str(source))
    staging = registry.staging_dir()
    for name in FILES:
        shutil.copyfile(source / name, staging / name)
    targets = lora.get("target_modules") or ()
    info = AdapterInfo(
        id=adapter_id,
        base_model=config.base_model,
        r=int(lora["r"]),
        alpha=float(lora.get("lora_alpha", lora["r"])),
        dropout=float(lora.get("lora_dropout", 0.0)),
        target_modules=(targets,) if isinstance(targets, str) else tuple(sorted(targets)),
        source_job_id="",
        final_loss=0.0,
        steps=0,
        trained_tokens=0,
    )
    return registry.register(staging, info)
