"""tuneserve.inference.lora_batch and lora_files: one forward with rows on different
adapters (different ranks, targets, scalings, an embedding LoRA) and on the base model gives
each row what peft gives with that adapter alone, on GPT-2 (Conv1D) and Llama (Linear)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from tuneserve.errors import FailedPrecondition
from tuneserve.inference.lora_batch import BatchedLoraEmbedding, BatchedLoraLinear, MultiLora
from tuneserve.inference.lora_files import read_lora
from tuneserve.models import load_model, load_tokenizer

CPU = torch.device("cpu")
PROMPTS = ["Question: Who is your father? Answer:", "Hello", "The quick brown fox", "LoRA"]
STEPS = 8

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`"),
]


@dataclass(frozen=True)
class Spec:
    """One adapter: its rank, alpha, targets and peft options."""

    r: int
    targets: tuple[str, ...]
    alpha: float = 8.0
    extra: dict[str, Any] = field(default_factory=dict)


# Per architecture: ranks 2, 4 and 8 (padded to 8 on shared layers), different targets,
# rsLoRA, a per-module alpha, and LoRA on the token embedding.
SPECS = {
    "gpt2": {
        "attn": Spec(4, ("c_attn",)),
        "wide": Spec(8, ("c_attn", "c_proj", "c_fc"), alpha=16.0, extra={"use_rslora": True}),
        "embed": Spec(2, ("wte", "c_fc"), extra={"alpha_pattern": {"c_fc": 32.0}}),
    },
    "llama": {
        "attn": Spec(4, ("q_proj", "v_proj")),
        "wide": Spec(8, ("q_proj", "k_proj", "o_proj", "down_proj"), extra={"use_rslora": True}),
        "embed": Spec(2, ("embed_tokens", "up_proj", "lm_head"), alpha=4.0),
    },
}


def base_model(base_dir: Path) -> Any:
    return load_model(str(base_dir), device=CPU, dtype=torch.float32).eval()


def save_adapter(base_dir: Path, out: Path, spec: Spec, seed: int) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B, saved as peft saves it."""
    torch.manual_seed(seed)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        init_lora_weights=False,
        **spec.extra,
    )
    get_peft_model(base_model(base_dir), config).save_pretrained(out)
    return out


@dataclass
class Setup:
    arch: str
    base_dir: Path
    adapters: dict[str, Path]
    tokenizer: Any


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    base_dir: Path = request.getfixturevalue(f"tiny_{request.param}")
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    adapters = {
        name: save_adapter(base_dir, root / name, spec, seed)
        for seed, (name, spec) in enumerate(SPECS[request.param].items(), start=1)
    }
    return Setup(request.param, base_dir, adapters, load_tokenizer(str(base_dir)))


def batched(setup: Setup, *names: str) -> tuple[Any, MultiLora]:
    model = base_model(setup.base_dir)
    lora = MultiLora(model)
    for name in names:
        lora.add(name, read_lora(name, setup.adapters[name], model))
    return model, lora


def reference(setup: Setup, name: str) -> Any:
    """The base model, or the adapter loaded alone with plain peft."""
    model = base_model(setup.base_dir)
    if not name:
        return model
    return PeftModel.from_pretrained(model, str(setup.adapters[name])).eval()


@torch.inference_mode()
def decode(
    model: Any,
    prompts: list[list[int]],
    steps: int,
    lora: MultiLora | None = None,
    rows: list[str] | None = None,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy decoding of left-padded prompts in one batch with a KV cache, as the
    scheduler does: the tokens of each row and the logits of every step."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if lora is not None:
        assert rows is not None
        lora.select(rows)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    logits = [out.logits[:, -1]]
    tokens = [logits[-1].argmax(-1)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=tokens[-1][:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        logits.append(out.logits[:, -1])
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, dim=1).tolist(), logits


def prompt_ids(setup: Setup, n: int) -> list[list[int]]:
    return [setup.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(n)]


def assert_rows_as_alone(setup: Setup, model: Any, lora: MultiLora, rows: list[str]) -> None:
    prompts = prompt_ids(setup, len(rows))
    tokens, logits = decode(model, prompts, STEPS, lora, rows)
    for i, name in enumerate(rows):
        alone_tokens, alone_logits = decode(reference(setup, name), [prompts[i]], STEPS)
        assert tokens[i] == alone_tokens[0], f"row {i} ({name or 'base'})"
        for step, (mine, theirs) in enumerate(zip(logits, alone_logits, strict=True)):
            torch.testing.assert_close(
                mine[i], theirs[0], rtol=1e-4, atol=1e-4, msg=f"row {i} step {step}"
            )


# --- the same tokens and logits as peft with each adapter alone


def test_a_mixed_batch_gives_each_row_what_its_adapter_gives_alone(setup: Setup) -> None:
    model, lora = batched(setup, "attn", "wide", "embed")
    assert_rows_as_alone(setup, model, lora, ["attn", "", "wide", "embed", "attn", ""])


@pytest.mark.parametrize("name", ["attn", "wide", "embed"])
def test_a_batch_on_one_adapter_takes_the_plain_path_and_matches_peft(
    setup: Setup, name: str
) -> None:
    model, lora = batched(setup, "attn", "wide", "embed")
    assert_rows_as_alone(setup, model, lora, [name, name, name])


def test_a_batch_on_the_base_model_is_the_bare_model_exactly(setup: Setup) -> None:
    model, lora = batched(setup, "attn", "embed")
    prompts = prompt_ids(setup, 3)
    tokens, logits = decode(model, prompts, STEPS, lora, ["", "", ""])
    bare_tokens, bare_logits = decode(base_model(setup.base_dir), prompts, STEPS)
    assert tokens == bare_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, bare_logits, strict=True))


def test_the_adapters_really_differ(setup: Setup) -> None:
    model, lora = batched(setup, "attn", "wide", "embed")
    rows = ["", "attn", "wide", "embed"]
    prompt = prompt_ids(setup, 1) * len(rows)
    lora.select(rows)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor(prompt)).logits[:, -1]
    for i in range(len(rows)):
        for j in range(i):
            assert not torch.allclose(logits[i], logits[j], atol=1e-3)


# --- slots come and go


def test_a_removed_adapter_frees_its_slot_and_layers_for_the_next(setup: Setup) -> None:
    model, lora = batched(setup, "embed", "attn")  # rank 2 first, then rank 4 on shared layers
    bare = [n for n, _ in base_model(setup.base_dir).named_modules()]
    lora.remove("embed")
    assert lora.adapters == ["attn"]
    assert lora.layers_of("embed") == []
    lora.add("wide", read_lora("wide", setup.adapters["wide"], model))  # takes slot 1 again
    assert_rows_as_alone(setup, model, lora, ["wide", "attn", "", "wide"])
    lora.remove("attn")
    lora.remove("wide")
    assert [n for n, _ in model.named_modules()] == bare  # every layer unwrapped
    assert not [n for n, m in model.named_modules() if hasattr(m, "base_layer")]


def test_layers_of_names_the_adapted_layers(setup: Setup) -> None:
    _, lora = batched(setup, "attn")
    targets = SPECS[setup.arch]["attn"].targets
    layers = lora.layers_of("attn")
    assert layers and all(name.rsplit(".", 1)[1] in targets for name in layers)


# --- what cannot be batched is refused before anything is loaded


def rewrite(
    source: Path,
    out: Path,
    *,
    config: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    out.mkdir(parents=True)
    cfg = json.loads((source / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    weights = load_file(str(source / "adapter_model.safetensors"))
    save_file({**weights, **(tensors or {})}, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "IA3"),
    ],
)
def test_adapters_that_cannot_be_batched_are_refused(
    setup: Setup, tmp_path: Path, config: dict[str, Any], words: str
) -> None:
    model, lora = batched(setup, "attn")
    odd = rewrite(setup.adapters["wide"], tmp_path / "odd", config=config)
    with pytest.raises(FailedPrecondition) as exc:
        read_lora("odd", odd, model)
    assert exc.value.field == "adapter_id"
    assert "'odd'" in exc.value.message and words in exc.value.message
    assert lora.adapters == ["attn"]


FIRST_LAYER = {"gpt2": "transformer.h.0.attn.c_attn", "llama": "model.layers.0.self_attn.q_proj"}


@pytest.mark.parametrize(
    ("what", "words"),
    [
        ("extra", "is not a LoRA matrix"),
        ("base-copy", "is not a LoRA matrix"),
        ("lonely", "without its pair"),
        ("shape", "do not fit"),
        ("nan", "NaN"),
    ],
)
def test_malformed_weights_are_refused(setup: Setup, tmp_path: Path, what: str, words: str) -> None:
    model, lora = batched(setup, "attn")
    layer = FIRST_LAYER[setup.arch]
    key = f"base_model.model.{layer}"
    weights = load_file(str(setup.adapters["attn"] / "adapter_model.safetensors"))
    a = weights[f"{key}.lora_A.weight"]
    tensors = {
        "extra": {f"{key}.bias": torch.zeros(3)},
        "base-copy": {f"{key}.base_layer.weight": torch.ones(a.shape[1], 5)},
        "lonely": {f"base_model.model.{layer.replace('.0.', '.1.')}.lora_A.weight": a},
        "shape": {f"{key}.lora_A.weight": torch.zeros(4, a.shape[1] + 1)},
        "nan": {f"{key}.lora_A.weight": torch.full_like(a, float("nan"))},
    }[what]
    bad = rewrite(setup.adapters["attn"], tmp_path / "bad", tensors=tensors)
    if what == "lonely":  # drop the B of layer 1 so its A is alone
        w = load_file(str(bad / "adapter_model.safetensors"))
        w.pop(f"base_model.model.{layer.replace('.0.', '.1.')}.lora_B.weight", None)
        save_file(w, str(bad / "adapter_model.safetensors"))
    with pytest.raises(FailedPrecondition) as exc:
        read_lora("bad", bad, model)
    assert words in exc.value.message
    assert lora.adapters == ["attn"]


def test_a_saved_copy_of_an_unchanged_base_layer_is_accepted(setup: Setup, tmp_path: Path) -> None:
    """peft saves an adapted embedding's base weights beside its LoRA: identical to this
    base model's, they are skipped."""
    model, _ = batched(setup)
    layer = FIRST_LAYER[setup.arch]
    weight = model.get_submodule(layer).weight.detach().clone()
    copy = rewrite(
        setup.adapters["attn"],
        tmp_path / "copy",
        tensors={f"base_model.model.{layer}.base_layer.weight": weight},
    )
    assert set(read_lora("copy", copy, model)) == set(
        read_lora("attn", setup.adapters["attn"], model)
    )


@torch.inference_mode()
def last_logits(model: Any, prompt: list[int], rows: int = 1) -> torch.Tensor:
    return model(input_ids=torch.tensor([prompt] * rows)).logits[:, -1]


def test_matrices_gathered_for_one_batch_are_never_reused_for_another(setup: Setup) -> None:
    """Rows keep their gathered matrices from step to step; a new arrangement of rows, or a
    new adapter in a freed slot (the very same slot ids), must gather again."""
    model, lora = batched(setup, "attn", "embed")
    prompt = prompt_ids(setup, 1)[0]
    alone = {
        name: last_logits(reference(setup, name), prompt)[0]
        for name in ("", "attn", "embed", "wide")
    }

    def check(rows: list[str]) -> None:
        lora.select(rows)
        for logits, name in zip(last_logits(model, prompt, len(rows)), rows, strict=True):
            torch.testing.assert_close(logits, alone[name], rtol=1e-4, atol=1e-4)

    check(["attn", "embed", ""])
    check(["attn", "embed", ""])  # the same rows again: gathered once
    check(["embed", "", "attn"])
    check(["attn", "attn", "attn"])
    check(["embed", "", "attn"])
    lora.remove("embed")
    lora.add("wide", read_lora("wide", setup.adapters["wide"], model))  # embed's slot
    check(["wide", "", "attn"])  # the same slot ids as the last batch


def wrapped(model: Any) -> list[BatchedLoraLinear | BatchedLoraEmbedding]:
    return [m for m in model.modules() if isinstance(m, BatchedLoraLinear | BatchedLoraEmbedding)]


def test_gathered_matrices_are_dropped_once_no_row_needs_them(setup: Setup) -> None:
    model, lora = batched(setup, "attn", "embed")
    prompt = prompt_ids(setup, 1)[0]
    lora.select(["attn", "embed", ""])
    last_logits(model, prompt, 3)
    assert any(layer._rows is not None for layer in wrapped(model))
    for rows in (["attn", "attn"], ["", ""], ["embed", "embed"]):
        lora.select(rows)
        last_logits(model, prompt, 2)
        assert all(layer._rows is None for layer in wrapped(model)), rows


def test_the_embedding_gathers_only_b_per_row(setup: Setup) -> None:
    """The embedding indexes A by token on each forward: a per-row gather of A would be
    [rows, R, vocabulary] held for nothing."""
    model, lora = batched(setup, "attn", "embed")
    lora.select(["embed", "", "attn"])
    last_logits(model, prompt_ids(setup, 1)[0], 3)
    [embedding] = [m for m in wrapped(model) if isinstance(m, BatchedLoraEmbedding)]
    assert embedding._rows is not None
    [b] = embedding._rows[1]
    assert b.shape == (3, *embedding.lora_b.shape[1:])


def test_rows_that_differ_from_the_selection_are_refused_by_name(setup: Setup) -> None:
    model, lora = batched(setup, "attn", "embed")
    lora.select(["embed", "", "attn"])
    with pytest.raises(RuntimeError, match=r"LoRA layer \S+: the input has 2 rows .* for 3"):
        last_logits(model, prompt_ids(setup, 1)[0], 2)
