"""End to end (issue 18 item 3): ImportAdapter of a poison config is refused with a client
error and registers nothing, and one damaged adapter on disk never breaks ListAdapters."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.support import make_config
from tuneserve.models import load_model
from tuneserve_client import ClientError, TuneserveClient

pytestmark = pytest.mark.e2e


def save_adapter(base_dir: Path, out: Path, **changes: Any) -> Path:
    """A peft LoRA adapter for the tiny GPT-2, its config changed by `changes`."""
    torch.manual_seed(1)
    base = load_model(str(base_dir), device=torch.device("cpu"), dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"])
    get_peft_model(base, config).save_pretrained(out)
    config_file = out / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return out


def test_poison_imports_and_damaged_entries_leave_list_adapters_working(
    tiny_gpt2: Path, tmp_path: Path, server_factory: Any
) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    server = server_factory(
        make_config(tiny_gpt2, tmp_path / "data", adapter_import_roots=(imports,))
    )
    with TuneserveClient(server.target) as client:
        good = client.import_adapter(str(save_adapter(tiny_gpt2, imports / "good")), "good")
        assert (good.lora.r, good.lora.alpha) == (4, 8.0)

        poisons = {
            "huge-r": ({"r": 2**70}, "r is 1180591620717411303424"),
            "bool-r": ({"r": True}, "r is True"),
            "inf-alpha": ({"lora_alpha": 1e999}, "lora_alpha is inf"),
            "text-alpha": ({"lora_alpha": "abc"}, "lora_alpha is 'abc'"),
            "alora": ({"alora_invocation_tokens": [17, 42]}, "aLoRA"),
        }
        for name, (changes, words) in poisons.items():
            source = save_adapter(tiny_gpt2, imports / name, **changes)
            with pytest.raises(ClientError) as e:
                client.import_adapter(str(source), name)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
            assert e.value.field == "path"
            assert words in e.value.message
        assert [a.id for a in client.list_adapters()] == ["good"]

        # An entry damaged in the index (not written by this server, or corrupted since).
        with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
            db.execute(
                "INSERT INTO adapters (id, version, key, info, source_job_id, created_at)"
                " VALUES ('broken', 'v', 'adapters/broken/v', ?, '', 1)",
                ('{"id": "broken", "r": 1e999',),
            )
        assert [a.id for a in client.list_adapters()] == ["good"]
        with pytest.raises(ClientError) as e:
            client.get_adapter("broken")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "damaged" in e.value.message
        client.delete_adapter("broken")
        with pytest.raises(ClientError) as e:
            client.get_adapter("broken")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert [a.id for a in client.list_adapters()] == ["good"]


def test_imports_cannot_follow_links_out_of_the_roots_or_freeze_on_a_pattern(
    tiny_gpt2: Path, tmp_path: Path, server_factory: Any
) -> None:
    imports, outside = tmp_path / "imports", tmp_path / "outside"
    imports.mkdir()
    server = server_factory(
        make_config(tiny_gpt2, tmp_path / "data", adapter_import_roots=(imports,))
    )
    with TuneserveClient(server.target) as client:
        # A directory inside the roots whose weights file links to one outside them.
        save_adapter(tiny_gpt2, outside)
        linked = imports / "linked"
        linked.mkdir()
        (linked / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
        (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
        with pytest.raises(ClientError) as e:
            client.import_adapter(str(linked), "linked")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the allowed adapter roots" in e.value.message

        # A pattern that backtracks without end would hold the GIL in the server forever.
        source = save_adapter(tiny_gpt2, imports / "runaway", alpha_pattern={r"(.*.*)*z": 8})
        with pytest.raises(ClientError) as e:
            client.import_adapter(str(source), "runaway", timeout=60)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "backtracking" in e.value.message
        assert client.generate("hello", max_new_tokens=2, greedy=True).generated_tokens >= 1
        assert client.list_adapters() == []
