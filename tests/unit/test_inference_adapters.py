"""tuneserve.inference.adapters: the LRU adapter cache over a real tiny GPT-2 and registry,
the servability and shape checks, reading an imported adapter's config, and the import
itself (Engine.import_adapter), which checks everything before it registers anything."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from tuneserve.config import ServerConfig
from tuneserve.errors import FailedPrecondition, InvalidArgument, NotFound
from tuneserve.inference.adapters import (
    AdapterCache,
    check_servable,
    read_lora_config,
)
from tuneserve.inference.engine import Engine
from tuneserve.inference.lora_files import read_lora
from tuneserve.models import load_model
from tuneserve.registry import AdapterInfo, AdapterRegistry, local_registry
from tuneserve.tiny_models import tiny_config

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 17, 42, 99, 7]])
ADAPTERS = ("a1", "a2", "a3")

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted"),
]


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path, add_adapter: Any
) -> AdapterRegistry:
    registry = local_registry(tmp_path_factory.mktemp("registry"))
    for seed, adapter_id in enumerate(ADAPTERS, start=1):
        add_adapter(registry, tiny_gpt2, adapter_id, seed=seed)
    add_adapter(registry, tiny_gpt2, "classifier", seed=7, task="classification", labels=("n", "p"))
    add_adapter(registry, tiny_gpt2, "dora", seed=8, use_dora=True)
    add_adapter(registry, tiny_gpt2, "other-base", seed=9, base_model="org/another-model")
    return registry


def fresh_model(base_dir: Path) -> PreTrainedModel:
    model = load_model(str(base_dir), device=CPU, dtype=torch.float32)
    model.eval()
    return model


@torch.inference_mode()
def logits_of(model: Any, **kw: Any) -> torch.Tensor:
    return model(input_ids=IDS, **kw).logits


@pytest.fixture(scope="module")
def expected(tiny_gpt2: Path, registry: AdapterRegistry) -> dict[str, torch.Tensor]:
    """Logits of the base model ("") and of each adapter loaded alone with plain peft."""
    out = {"": logits_of(fresh_model(tiny_gpt2))}
    for adapter_id in ADAPTERS:
        peft = PeftModel.from_pretrained(fresh_model(tiny_gpt2), str(registry.path(adapter_id)))
        out[adapter_id] = logits_of(peft.eval())
    for a in ADAPTERS:  # every adapter changes the output, each differently
        assert not torch.allclose(out[a], out[""])
    assert not torch.allclose(out["a1"], out["a2"])
    return out


@pytest.fixture()
def cache(tiny_gpt2: Path, registry: AdapterRegistry) -> AdapterCache:
    return AdapterCache(
        model=fresh_model(tiny_gpt2), registry=registry, base_model=str(tiny_gpt2), capacity=2
    )


def assert_serves(cache: AdapterCache, expected: dict[str, torch.Tensor], *ids: str) -> None:
    """One mixed batch, one row per adapter id ("" the base), each as if alone."""
    batch = IDS.expand(len(ids), -1)
    with torch.inference_mode():
        logits = cache.forward(list(ids), input_ids=batch).logits
    for row, adapter_id in enumerate(ids):
        torch.testing.assert_close(logits[row : row + 1], expected[adapter_id])


def loaded_in_model(cache: AdapterCache) -> set[str]:
    """The adapters whose weights sit in the model's layers."""
    return {a for a in (*ADAPTERS, "broken") if cache.layers_of(a)}


def lora_modules(model: Any) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "base_layer")]


# --- the LRU cache


def test_loading_past_capacity_evicts_the_least_recently_used(
    cache: AdapterCache, expected: dict[str, torch.Tensor]
) -> None:
    assert cache.ensure("a1") and cache.ensure("a2")
    assert cache.loaded == ["a1", "a2"]
    assert cache.ensure("a3")
    assert cache.loaded == ["a2", "a3"]
    assert loaded_in_model(cache) == {"a2", "a3"}  # a1's weights are gone from the model
    assert (cache.loads, cache.evictions) == (3, 1)
    assert_serves(cache, expected, "a3", "", "a2")


def test_a_hit_touches_the_entry_so_another_is_evicted(
    cache: AdapterCache, expected: dict[str, torch.Tensor]
) -> None:
    cache.ensure("a1")
    cache.ensure("a2")
    assert cache.ensure("a1")  # a hit: nothing loaded, a1 is now the most recently used
    assert cache.loads == 2
    assert cache.loaded == ["a2", "a1"]
    cache.ensure("a3")
    assert cache.loaded == ["a1", "a3"]
    assert loaded_in_model(cache) == {"a1", "a3"}
    assert_serves(cache, expected, "a1", "a3")


def test_adapters_in_use_are_never_evicted(
    cache: AdapterCache, expected: dict[str, torch.Tensor]
) -> None:
    cache.ensure("a1")
    cache.ensure("a2")
    cache.acquire("a1")  # the least recently used, but a request runs with it
    assert cache.ensure("a3")
    assert cache.loaded == ["a1", "a3"]

    cache.acquire("a3")
    cache.acquire("a3")  # two requests
    assert cache.ensure("a2") is False  # every slot busy: the caller waits
    assert cache.loaded == ["a1", "a3"]
    assert (cache.loads, cache.evictions) == (3, 1)

    cache.release("a3")  # one of the two requests on a3 is still running
    assert cache.ensure("a2") is False
    cache.release("a3")
    assert cache.ensure("a2")
    assert cache.loaded == ["a1", "a2"]
    assert_serves(cache, expected, "a1", "a2", "")


def test_pinned_adapters_are_never_evicted(
    cache: AdapterCache, expected: dict[str, torch.Tensor]
) -> None:
    cache.ensure("a1")
    cache.pin("a1", True)
    cache.ensure("a2")
    cache.ensure("a3")
    assert cache.loaded == ["a1", "a3"]  # a1 was the least recently used, but pinned
    assert cache.pinned == {"a1"}

    cache.pin("a3", True)
    with pytest.raises(FailedPrecondition) as info:
        cache.ensure("a2")
    assert info.value.field == "adapter_id"
    assert "pinned" in info.value.message
    assert cache.loaded == ["a1", "a3"]
    assert (cache.loads, cache.evictions) == (3, 1)

    cache.pin("a3", False)
    assert cache.ensure("a2")
    assert cache.loaded == ["a1", "a2"]
    assert_serves(cache, expected, "a2", "a1")


def test_slots_pinned_or_in_use_make_the_caller_wait_rather_than_fail(
    cache: AdapterCache,
) -> None:
    cache.ensure("a1")
    cache.ensure("a2")
    cache.pin("a1", True)
    cache.acquire("a2")  # will be released when its request ends
    assert cache.ensure("a3") is False
    assert cache.loaded == ["a1", "a2"]


def test_drop_refuses_an_adapter_in_use(cache: AdapterCache) -> None:
    cache.ensure("a1")
    cache.ensure("a2")
    cache.pin("a1", True)
    cache.acquire("a1")
    assert cache.drop("a1") is False
    assert cache.loaded == ["a1", "a2"]
    assert cache.pinned == {"a1"}
    cache.release("a1")
    assert cache.drop("a1") is True
    assert cache.loaded == ["a2"]
    assert cache.pinned == set()
    assert loaded_in_model(cache) == {"a2"}
    assert cache.evictions == 1
    assert cache.drop("a1") is True  # not loaded: nothing to do
    assert cache.evictions == 1


def test_an_adapter_replaced_while_in_use_is_reloaded_once_its_requests_end(
    tiny_gpt2: Path, tmp_path: Path, add_adapter: Any, expected: dict[str, torch.Tensor]
) -> None:
    """Invalidated while a request runs on it: that request keeps the old matrices, a new
    one waits, and gets the adapter as it is on disk once the old ones are gone."""
    registry = local_registry(tmp_path / "adapters")
    add_adapter(registry, tiny_gpt2, "x", seed=1)  # the same matrices as a1
    add_adapter(registry, tiny_gpt2, "y", seed=2)  # and as a2
    cache = AdapterCache(
        model=fresh_model(tiny_gpt2), registry=registry, base_model=str(tiny_gpt2), capacity=2
    )
    assert cache.ensure("x")
    cache.acquire("x")
    weights = "adapter_model.safetensors"
    (registry.path("x") / weights).write_bytes((registry.path("y") / weights).read_bytes())
    cache.invalidate("x")  # retrained under the same id
    assert cache.drop("x") is False  # still in use
    with torch.inference_mode():  # the running request is still served the old matrices
        old = cache.forward(["x"], input_ids=IDS).logits
    torch.testing.assert_close(old, expected["a1"])
    assert cache.ensure("x") is False  # a new request waits rather than get the old ones
    cache.release("x")
    assert cache.loaded == []  # evicted as its last request ended
    assert cache.ensure("x")
    with torch.inference_mode():
        new = cache.forward(["x"], input_ids=IDS).logits
    torch.testing.assert_close(new, expected["a2"])
    assert (cache.loads, cache.evictions) == (2, 1)
    cache.invalidate("x")  # not in use: unloaded at once
    assert cache.loaded == []
    cache.invalidate("x")  # not loaded: nothing to do
    assert cache.evictions == 2


def test_evicting_the_last_adapter_returns_the_plain_model(
    cache: AdapterCache, expected: dict[str, torch.Tensor]
) -> None:
    bare = module_names(cache.model)
    cache.ensure("a1")
    assert lora_modules(cache.model) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    assert cache.drop("a1")
    assert isinstance(cache.model, PreTrainedModel)
    assert lora_modules(cache.model) == []
    assert module_names(cache.model) == bare
    torch.testing.assert_close(logits_of(cache.model), expected[""])

    # ...and adapters load onto it again as before
    cache.ensure("a2")
    cache.ensure("a1")
    assert_serves(cache, expected, "a1", "", "a2")


def test_eviction_by_capacity_of_the_last_one_also_unwraps(cache: AdapterCache) -> None:
    small = AdapterCache(
        model=cache.model, registry=cache._registry, base_model=cache._base_model, capacity=1
    )
    small.ensure("a1")
    small.ensure("a2")
    assert small.loaded == ["a2"]
    assert loaded_in_model(small) == {"a2"}
    small.drop("a2")
    assert lora_modules(small.model) == []
    assert (small.loads, small.evictions) == (2, 2)


def test_an_empty_adapter_id_is_the_base_model(
    cache: AdapterCache, expected: dict[str, torch.Tensor]
) -> None:
    cache.ensure("a1")
    assert_serves(cache, expected, "", "a1", "")
    assert_serves(cache, expected, "", "")
    assert_serves(cache, expected, "a1", "a1")


def test_the_base_model_needs_no_slot(cache: AdapterCache) -> None:
    assert cache.ensure("")
    cache.acquire("")
    cache.release("")
    assert cache.loaded == []
    assert cache.loads == 0
    assert lora_modules(cache.model) == []


@pytest.mark.parametrize(
    ("adapter_id", "error"),
    [
        ("classifier", FailedPrecondition),
        ("dora", FailedPrecondition),
        ("other-base", FailedPrecondition),
        ("missing", NotFound),
    ],
)
def test_an_adapter_that_cannot_be_served_evicts_nothing(
    cache: AdapterCache, expected: dict[str, torch.Tensor], adapter_id: str, error: type
) -> None:
    cache.ensure("a1")
    cache.ensure("a2")
    with pytest.raises(error) as info:
        cache.ensure(adapter_id)
    assert info.value.field == "adapter_id"
    assert cache.loaded == ["a1", "a2"]
    assert loaded_in_model(cache) == {"a1", "a2"}
    assert (cache.loads, cache.evictions) == (2, 0)
    assert_serves(cache, expected, "a1", "a2", "")


def test_a_load_that_fails_leaves_the_model_as_it_was(
    tiny_gpt2: Path, tmp_path: Path, add_adapter: Any, expected: dict[str, torch.Tensor]
) -> None:
    registry = local_registry(tmp_path / "adapters")
    add_adapter(registry, tiny_gpt2, "broken", seed=1)
    weights = registry.path("broken") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file
    cache = AdapterCache(
        model=fresh_model(tiny_gpt2), registry=registry, base_model=str(tiny_gpt2), capacity=2
    )
    modules = [n for n, _ in cache.model.named_modules()]
    with pytest.raises(Exception):  # noqa: B017 - whatever peft raises
        cache.ensure("broken")
    assert cache.loaded == [] and cache.loads == 0
    assert [n for n, _ in cache.model.named_modules()] == modules
    torch.testing.assert_close(logits_of(cache.model), expected[""])


# --- check_servable


def info(**overrides: Any) -> AdapterInfo:
    fields: dict[str, Any] = {
        "id": "vader",
        "base_model": "org/base",
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "target_modules": ("c_attn",),
        "source_job_id": "job",
        "final_loss": 1.0,
        "steps": 1,
        "trained_tokens": 10,
        **overrides,
    }
    return AdapterInfo(**fields)


def test_a_generation_lora_adapter_of_this_base_is_servable() -> None:
    check_servable(info(), "org/base")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"task": "classification", "labels": ("a", "b")}, "classifier"),
        ({"use_dora": True}, "DoRA"),
        ({"base_model": "org/other"}, "org/other"),
    ],
)
def test_check_servable_refuses(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(FailedPrecondition) as exc:
        check_servable(info(**overrides), "org/base")
    assert exc.value.field == "adapter_id"
    assert "'vader'" in exc.value.message
    assert words in exc.value.message


# --- read_lora as the import check (field "path")


def module_names(model: Any) -> list[str]:
    return [n for n, _ in model.named_modules()]


def fits(model: Any, directory: Path) -> None:
    read_lora("imported", directory, model, field="path")


def test_a_matching_adapter_fits_the_model_and_leaves_it_alone(
    cache: AdapterCache, registry: AdapterRegistry
) -> None:
    before = module_names(cache.model)
    fits(cache.model, registry.path("a3"))
    assert module_names(cache.model) == before
    cache.ensure("a1")  # also with adapters loaded on the model (layers wrapped)
    before = module_names(cache.model)
    fits(cache.model, registry.path("a3"))
    assert module_names(cache.model) == before


def test_an_adapter_of_another_architecture_does_not_fit(
    cache: AdapterCache, tiny_llama: Path, tmp_path: Path, save_lora: Any
) -> None:
    llama = save_lora(tiny_llama, tmp_path / "llama", seed=1, target_modules=("q_proj",))
    before = module_names(cache.model)
    state = {k: v.clone() for k, v in cache.model.state_dict().items()}
    with pytest.raises(FailedPrecondition) as exc:
        fits(cache.model, llama)
    assert exc.value.field == "path"
    assert "q_proj" in exc.value.message
    assert "does not have" in exc.value.message
    assert module_names(cache.model) == before
    assert cache.model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in cache.model.state_dict().items())


def lora_dir(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


C_ATTN = "base_model.model.transformer.h.1.attn.c_attn"  # the tiny GPT-2's: 64 in, 192 out


@pytest.mark.parametrize(("a", "b"), [([4, 32], [192, 4]), ([4, 64], [96, 4])])
def test_a_lora_matrix_of_the_wrong_shape_does_not_fit(
    cache: AdapterCache, tmp_path: Path, a: list[int], b: list[int]
) -> None:
    tensors = {f"{C_ATTN}.lora_A.weight": torch.zeros(a), f"{C_ATTN}.lora_B.weight": torch.zeros(b)}
    with pytest.raises(FailedPrecondition) as exc:
        fits(cache.model, lora_dir(tmp_path / "bad", tensors))
    assert exc.value.field == "path"
    assert "transformer.h.1.attn.c_attn" in exc.value.message
    assert "64 in and 192 out" in exc.value.message


def test_a_lora_of_rank_0_is_refused_not_divided_by(cache: AdapterCache, tmp_path: Path) -> None:
    tensors = {
        f"{C_ATTN}.lora_A.weight": torch.zeros(0, 64),
        f"{C_ATTN}.lora_B.weight": torch.zeros(192, 0),
    }
    with pytest.raises(FailedPrecondition) as exc:
        fits(cache.model, lora_dir(tmp_path / "r0", tensors))
    assert exc.value.field == "path"
    assert "rank 0" in exc.value.message


def test_an_embedding_lora_for_another_vocabulary_does_not_fit(
    cache: AdapterCache, tokenizer: Any, tmp_path: Path
) -> None:
    """An adapter with LoRA on the token embedding, made on a GPT-2 of 600 tokens (this one
    has 512): peft cannot load it onto this model, so the import check must refuse it."""
    other = AutoModelForCausalLM.from_config(tiny_config("gpt2", 600, tokenizer))
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["wte"])
    get_peft_model(other, config).save_pretrained(tmp_path / "emb")
    with pytest.raises(FailedPrecondition) as exc:
        fits(cache.model, tmp_path / "emb")
    assert "wte" in exc.value.message


# --- read_lora_config


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_a_peft_lora_config_is_read(registry: AdapterRegistry) -> None:
    config = read_lora_config(registry.path("a1"))
    assert config.peft_type == "LORA"
    assert config.r == 4
    assert config.target_modules == {"c_attn"}


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (None, "adapter_config.json cannot be read"),
        ("{not json", "adapter_config.json is not JSON"),
        ("[1]", "adapter_config.json holds a list"),
        ({"peft_type": "PREFIX_TUNING", "r": 4}, "PREFIX_TUNING"),
        ({"r": 4}, "only LORA"),
        ({"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4}, "SEQ_CLS"),
        ({"peft_type": "LORA", "use_dora": True, "r": 4}, "DoRA"),
        ({"peft_type": "LORA", "r": 0}, "r is 0"),
        ({"peft_type": "LORA", "r": "8"}, "r is '8'"),
        ({"peft_type": "LORA", "r": True}, "r is True"),
        ({"peft_type": "LORA", "r": 2**70}, "from 1 to 4096"),
        ({"peft_type": "LORA", "lora_alpha": "abc"}, "lora_alpha is 'abc'"),
        ({"peft_type": "LORA", "alpha_pattern": {"(": 2}}, "not a regular expression"),
        ({"peft_type": "LORA", "target_modules": 5}, "target_modules is 5"),
        ({"peft_type": "LORA", "alora_invocation_tokens": [1, 2]}, "aLoRA"),
    ],
)
def test_read_lora_config_refuses(tmp_path: Path, config: Any, words: str) -> None:
    directory = tmp_path / "adapter"
    directory.mkdir()
    if isinstance(config, str):
        (directory / "adapter_config.json").write_text(config)
    elif config is not None:
        write_config(directory, config)
    with pytest.raises(InvalidArgument) as exc:
        read_lora_config(directory)
    assert exc.value.field == "path"
    assert exc.value.message.startswith("path: adapter_config.json")
    assert words in exc.value.message


def test_read_lora_config_accepts_no_task_type_and_fills_in_peft_defaults(tmp_path: Path) -> None:
    config = read_lora_config(write_config(tmp_path / "a", {"peft_type": "LORA"}))
    assert (config.task_type, config.r, config.lora_alpha) == (None, 8, 8)


def test_an_adapter_whose_config_was_damaged_on_disk_is_refused_on_load(
    cache: AdapterCache, tiny_gpt2: Path, tmp_path: Path, add_adapter: Any
) -> None:
    """A load reads the config with the same parser: a bad value is the adapter's fault
    (FailedPrecondition), not an error escaping from the scheduler's thread."""
    registry = local_registry(tmp_path / "adapters")
    add_adapter(registry, tiny_gpt2, "x", seed=1)
    config_file = registry.path("x") / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "lora_alpha": "8"}))
    damaged = AdapterCache(
        model=cache.model, registry=registry, base_model=str(tiny_gpt2), capacity=2
    )
    with pytest.raises(FailedPrecondition) as exc:
        damaged.ensure("x")
    assert exc.value.field == "adapter_id"
    assert "lora_alpha is '8'" in exc.value.message
    assert damaged.loaded == [] and lora_modules(cache.model) == []


# --- Engine.import_adapter: checked whole before anything is registered


@pytest.fixture()
def engine(tiny_gpt2: Path, tmp_path: Path) -> Iterator[Engine]:
    config = ServerConfig(
        base_model=str(tiny_gpt2),
        data_dir=tmp_path / "data",
        device="cpu",
        dtype="float32",
        adapter_import_roots=(tmp_path / "imports",),
    )
    engine = Engine(config=config, registry=local_registry(tmp_path / "adapters"))
    engine.load()
    try:
        yield engine
    finally:
        engine.stop()


def importable(tmp_path: Path, tiny_gpt2: Path, save_lora: Any, name: str, **changes: Any) -> Path:
    """A peft adapter (r 4, lora_alpha 8, c_attn) in the import root, config changed by
    `changes` (a value of `...` drops the key)."""
    directory = save_lora(tiny_gpt2, tmp_path / "imports" / name, seed=1)
    config_file = directory / "adapter_config.json"
    config = {**json.loads(config_file.read_text()), **changes}
    config_file.write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return directory


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"r": 2**70}, "r is 1180591620717411303424"),
        ({"r": True}, "r is True"),
        ({"lora_alpha": 1e999}, "lora_alpha is inf"),
        ({"lora_alpha": "abc"}, "lora_alpha is 'abc'"),
        ({"alpha_pattern": {"c_(attn": 2}}, "not a regular expression"),
        ({"target_modules": 5}, "target_modules is 5"),
        ({"alora_invocation_tokens": [17, 42]}, "aLoRA"),
        ({"use_qalora": True}, "QALoRA"),
    ],
)
def test_an_import_of_a_poison_config_registers_nothing(
    engine: Engine,
    tmp_path: Path,
    tiny_gpt2: Path,
    save_lora: Any,
    changes: dict[str, Any],
    words: str,
) -> None:
    """Issue 18 item 3: such an import failed INTERNAL and stayed registered, and from then
    on every ListAdapters failed."""
    registry = engine._registry
    ok = importable(tmp_path, tiny_gpt2, save_lora, "ok")
    engine.import_adapter(str(ok), "kept")
    poison = importable(tmp_path, tiny_gpt2, save_lora, "poison", **changes)
    with pytest.raises(InvalidArgument) as exc:
        engine.import_adapter(str(poison), "poison")
    assert exc.value.field == "path"
    assert words in exc.value.message
    assert not registry.exists("poison")
    assert [a.id for a in registry.list()] == ["kept"]
    assert list(registry.staging_root.iterdir()) == []


def test_an_import_whose_weights_do_not_fit_leaves_no_staging_behind(
    engine: Engine, tmp_path: Path, tiny_gpt2: Path, save_lora: Any
) -> None:
    misfit = importable(tmp_path, tiny_gpt2, save_lora, "misfit", r=8)  # rank-4 matrices
    with pytest.raises(FailedPrecondition) as exc:
        engine.import_adapter(str(misfit), "misfit")
    assert exc.value.field == "path"
    assert "gives r 8" in exc.value.message
    assert engine._registry.list() == []
    assert list(engine._registry.staging_root.iterdir()) == []


def test_an_import_records_the_config_as_peft_reads_it(
    engine: Engine, tmp_path: Path, tiny_gpt2: Path, save_lora: Any
) -> None:
    """No lora_alpha: peft's 8, not r (issue 18 item 9); no target_modules (peft picks them
    by architecture): the layers the matrices adapt. And the adapter serves as peft does."""
    source = importable(tmp_path, tiny_gpt2, save_lora, "bare", lora_alpha=..., target_modules=None)
    info = engine.import_adapter(str(source), "bare")
    assert (info.r, info.alpha, info.target_modules) == (4, 8.0, ("c_attn",))
    assert engine._registry.get("bare") == info

    expected = PeftModel.from_pretrained(fresh_model(tiny_gpt2), str(source)).eval()
    model = fresh_model(tiny_gpt2)
    served = AdapterCache(
        model=model, registry=engine._registry, base_model=str(tiny_gpt2), capacity=1
    )
    assert served.ensure("bare")
    with torch.inference_mode():
        got = served.forward(["bare"], input_ids=IDS).logits
    torch.testing.assert_close(got, logits_of(expected))
