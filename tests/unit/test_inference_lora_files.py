"""tuneserve.inference.lora_files: adapter configs parsed by peft and checked whole. Every
malformed config and every LoRA variant the batched forward does not implement is refused
with an error naming the field; what is accepted serves exactly what peft computes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tuneserve.errors import FailedPrecondition
from tuneserve.inference import lora_files
from tuneserve.inference.lora_batch import MultiLora
from tuneserve.inference.lora_files import ConfigError, read_config, read_lora
from tuneserve.models import load_model

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # peft's, on odd but valid configs
]


def base_model(base_dir: Path) -> Any:
    return load_model(str(base_dir), device=CPU, dtype=torch.float32).eval()


def save_peft(base_dir: Path, out: Path, **options: Any) -> Path:
    """A peft LoRA adapter with random (non-zero) matrices, saved as peft saves it."""
    torch.manual_seed(3)
    config = LoraConfig(
        task_type="CAUSAL_LM", lora_dropout=0.0, **{"r": 4, "init_lora_weights": False, **options}
    )
    model = get_peft_model(base_model(base_dir), config)
    with torch.no_grad():  # MiCA and others start from special matrices: make them random
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def good(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_peft(tiny_gpt2, tmp_path_factory.mktemp("good") / "a", target_modules=["c_attn"])


def with_config(source: Path, out: Path, text: str) -> Path:
    shutil.copytree(source, out)
    (out / "adapter_config.json").write_text(text)
    return out


def changed(source: Path, out: Path, **changes: Any) -> Path:
    """A copy of `source` whose config has `changes` (a value of `...` drops the key)."""
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not ...}
    return with_config(source, out, json.dumps(config))


# --- malformed configs


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[1, 2]", "holds a list, not an object"),
        ('"LORA"', "holds a str, not an object"),
        ("{not json", "is not JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not JSON"),
        ('{"peft_type": "IA3"}', "peft_type is 'IA3'; only LORA"),
        ('{"r": 4}', "peft_type is None"),
        ('{"peft_type": "LORA", "r": 1180591620717411303424}', "r is 1180591620717411303424"),
        ('{"peft_type": "LORA", "r": 4097}', "from 1 to 4096"),
        ('{"peft_type": "LORA", "r": true}', "r is True"),
        ('{"peft_type": "LORA", "r": 0}', "r is 0"),
        ('{"peft_type": "LORA", "r": "8"}', "r is '8'"),
        ('{"peft_type": "LORA", "r": 4.0}', "r is 4.0"),
        ('{"peft_type": "LORA", "lora_alpha": "abc"}', "lora_alpha is 'abc'"),
        ('{"peft_type": "LORA", "lora_alpha": 1e999}', "lora_alpha is inf"),
        ('{"peft_type": "LORA", "lora_alpha": NaN}', "lora_alpha is nan"),
        ('{"peft_type": "LORA", "lora_alpha": 0}', "lora_alpha is 0"),
        ('{"peft_type": "LORA", "lora_alpha": -8}', "lora_alpha is -8"),
        ('{"peft_type": "LORA", "lora_alpha": false}', "lora_alpha is False"),
        ('{"peft_type": "LORA", "alpha_pattern": {"c_(attn": 4}}', "not a regular expression"),
        ('{"peft_type": "LORA", "alpha_pattern": {"c_attn": "x"}}', "alpha_pattern['c_attn']"),
        ('{"peft_type": "LORA", "alpha_pattern": {"c_attn": 1e999}}', "is inf"),
        ('{"peft_type": "LORA", "alpha_pattern": [1]}', "alpha_pattern is [1]"),
        ('{"peft_type": "LORA", "rank_pattern": {"c_attn": 2.5}}', "rank_pattern['c_attn']"),
        ('{"peft_type": "LORA", "rank_pattern": {"[": 2}}', "not a regular expression"),
        ('{"peft_type": "LORA", "target_modules": 5}', "target_modules is 5"),
        ('{"peft_type": "LORA", "target_modules": [{}]}', "target_modules is [{}]"),
        ('{"peft_type": "LORA", "target_modules": "c_(attn"}', "not a regular expression"),
        ('{"peft_type": "LORA", "exclude_modules": 5}', "exclude_modules is 5"),
        ('{"peft_type": "LORA", "lora_dropout": 1.5}', "lora_dropout is 1.5"),
        ('{"peft_type": "LORA", "use_rslora": "false"}', "use_rslora is 'false'"),
        ('{"peft_type": "LORA", "task_type": "SEQ_CLS"}', "only CAUSAL_LM"),
        ('{"peft_type": "LORA", "task_type": "POETRY"}', "peft cannot read it"),
        ('{"peft_type": "LORA", "bias": 7}', "bias is 7"),
        ('{"peft_type": "LORA", "init_lora_weights": "magic"}', "does not know"),
        ('{"peft_type": "LORA", "init_lora_weights": 1}', "does not know"),
        ('{"peft_type": "LORA", "eva_config": 5}', "peft cannot read it"),
        ('{"peft_type": "LORA", "use_hyper_lora": true}', "'use_hyper_lora' is a setting"),
    ],
)
def test_a_malformed_config_is_refused_naming_the_field(
    tmp_path: Path, text: str, words: str
) -> None:
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ConfigError) as exc:
        read_config(tmp_path)
    assert words in str(exc.value)


def test_a_config_that_is_not_there_or_too_large_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        read_config(tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(b'{"peft_type": "LORA"}' + b" " * (1 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        read_config(tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "x": "\xff"}')
    with pytest.raises(ConfigError, match="is not JSON"):
        read_config(tmp_path)


# --- LoRA variants


VARIANT_VALUES: dict[str, Any] = {
    "use_dora": True,
    "alora_invocation_tokens": [5, 17],
    "use_qalora": True,
    "monteclora_config": {},
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {},
    "lora_bias": True,
    "layer_replication": [[0, 1], [0, 2]],
    "modules_to_save": ["lm_head"],
    "trainable_token_indices": [5, 6],
    "target_parameters": ["transformer.h.0.attn.c_attn.weight"],
    "megatron_config": {"tensor_model_parallel_size": 2},
    "ensure_weight_tying": True,
}


def test_every_field_of_peft_lora_config_has_been_reviewed() -> None:
    """Used, harmless or refused: a peft upgrade that adds a field fails here until someone
    decides which (meanwhile the parser refuses the field whenever it is set)."""
    fields = {f.name: f for f in dataclasses.fields(LoraConfig) if f.init}
    reviewed = lora_files.USED | lora_files.HARMLESS | set(lora_files.REFUSED)
    assert set(fields) <= reviewed
    assert not lora_files.USED & lora_files.HARMLESS
    assert not (lora_files.USED | lora_files.HARMLESS) & set(lora_files.REFUSED)
    # peft's own list of variants: each refused, but VeLoRA (its forward is LoRA's, tested
    # below); and each init_lora_weights variant is a plain init (MiCA, tested below).
    variants = {name for name, f in fields.items() if f.metadata.get("is_lora_variant")}
    assert variants - {"velora_config"} <= set(lora_files.REFUSED)
    assert set(fields["init_lora_weights"].metadata["lora_variants"]) <= lora_files.PLAIN_INITS
    assert set(VARIANT_VALUES) == set(lora_files.REFUSED)


@pytest.mark.parametrize("key", sorted(VARIANT_VALUES))
def test_each_lora_variant_the_batch_does_not_implement_is_refused(
    tmp_path: Path, good: Path, key: str
) -> None:
    adapter = changed(good, tmp_path / "v", **{key: VARIANT_VALUES[key]})
    with pytest.raises(ConfigError) as exc:
        read_config(adapter)
    assert lora_files.REFUSED[key] in str(exc.value)
    assert "does not implement" in str(exc.value)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"bias": "all"}, "trains the base model's biases"),
        ({"bias": "lora_only"}, "trains the base model's biases"),
        ({"init_lora_weights": "pissa"}, "changes the base model's weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "changes the base model's weights"),
        ({"init_lora_weights": "olora"}, "changes the base model's weights"),
        ({"init_lora_weights": "corda"}, "changes the base model's weights"),
        ({"init_lora_weights": "loftq"}, "changes the base model's weights"),
    ],
)
def test_adapters_trained_on_changed_base_weights_are_refused(
    tmp_path: Path, good: Path, changes: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        read_config(changed(good, tmp_path / "v", **changes))


def test_an_alora_adapter_is_not_served_as_plain_lora(
    tiny_gpt2: Path, tmp_path: Path, good: Path
) -> None:
    """Issue 18 item 9: served as plain LoRA, its logits were up to 5.9 away from peft's."""
    alora = changed(good, tmp_path / "alora", alora_invocation_tokens=[17, 42])
    with pytest.raises(FailedPrecondition) as exc:
        read_lora("alora", alora, base_model(tiny_gpt2))
    assert exc.value.field == "adapter_id"
    assert "'alora'" in exc.value.message and "aLoRA" in exc.value.message


def test_settings_this_server_does_not_know_are_ignored_only_when_unset(
    tmp_path: Path, good: Path
) -> None:
    old = changed(good, tmp_path / "old", enable_lora=None, merge_weights=False)  # peft 0.2's
    assert read_config(old).r == 4
    with pytest.raises(ConfigError, match="'merge_weights' is a setting"):
        read_config(changed(good, tmp_path / "set", merge_weights=True))


# --- accepted configs serve what peft computes


def served_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    model = base_model(base_dir)
    lora = MultiLora(model)
    lora.add("x", read_lora("x", adapter, model))
    lora.select(["x"])
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def peft_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    with torch.inference_mode():
        return (
            PeftModel.from_pretrained(base_model(base_dir), str(adapter))
            .eval()(input_ids=IDS)
            .logits
        )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_accepted_configs_serve_exactly_what_peft_computes(
    request: pytest.FixtureRequest, tmp_path: Path, arch: str
) -> None:
    """peft's scaling for rsLoRA, rank_pattern and alpha_pattern together, peft's default
    alpha (8) when lora_alpha is missing, and the variants whose forward is LoRA's: MiCA
    (an initialisation) and VeLoRA (a backward pass; its saved projection is skipped)."""
    base_dir: Path = request.getfixturevalue(f"tiny_{arch}")
    attn, mlp = ("c_attn", "c_fc") if arch == "gpt2" else ("q_proj", "up_proj")
    patterned = save_peft(
        base_dir,
        tmp_path / "patterned",
        target_modules=[attn, mlp],
        use_rslora=True,
        lora_alpha=6,
        rank_pattern={mlp: 2, f"h.1.attn.{attn}" if arch == "gpt2" else f"1.self_attn.{attn}": 8},
        alpha_pattern={mlp: 20},
    )
    no_alpha = changed(patterned, tmp_path / "no-alpha", lora_alpha=..., alpha_pattern={})
    assert read_config(no_alpha).lora_alpha == 8
    cases = {
        "patterned": patterned,
        "no-alpha": no_alpha,
        "mica": save_peft(
            base_dir, tmp_path / "mica", target_modules=[attn], init_lora_weights="mica"
        ),
        "velora": save_peft(
            base_dir, tmp_path / "velora", target_modules=[attn], velora_config={"num_groups": 4}
        ),
    }
    bare = peft_logits(base_dir, no_alpha)  # any adapter: to check each changes the output
    for name, adapter in cases.items():
        expected = peft_logits(base_dir, adapter)
        got = served_logits(base_dir, adapter)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
        if name != "no-alpha":
            assert not torch.allclose(expected, bare), name


def test_matrices_of_another_rank_than_the_config_are_refused(
    tiny_gpt2: Path, tmp_path: Path, good: Path
) -> None:
    """peft scales by the config's r and cannot load matrices of another rank: `r: 8` over
    rank-4 matrices is not served with the matrices' rank instead."""
    for r in (8, 2):
        adapter = changed(good, tmp_path / f"r{r}", r=r)
        with pytest.raises(FailedPrecondition) as exc:
            read_lora("x", adapter, base_model(tiny_gpt2))
        assert f"rank 4, but adapter_config.json gives r {r}" in exc.value.message


def test_a_malformed_config_is_refused_when_serving_too(
    tiny_gpt2: Path, tmp_path: Path, good: Path
) -> None:
    adapter = changed(good, tmp_path / "x", lora_alpha="abc")
    with pytest.raises(FailedPrecondition) as exc:
        read_lora("x", adapter, base_model(tiny_gpt2))
    assert exc.value.field == "adapter_id"
    assert "adapter_config.json: lora_alpha is 'abc'" in exc.value.message


def test_a_pattern_that_backtracks_without_end_is_refused_not_run_here() -> None:
    """Python's re holds the GIL and cannot be interrupted: such a pattern matched in the
    server would freeze it. It is matched in a child that is killed after the timeout."""
    import time

    from peft import LoraConfig

    from tuneserve.inference.lora_files import ConfigError, check_patterns_finish

    names = ["transformer.h.0.attn.c_attn_" + "a" * 30, "transformer.h.0.mlp.c_fc"]
    check_patterns_finish(LoraConfig(r=4, alpha_pattern={"c_attn": 8}), names)  # fine
    started = time.monotonic()
    with pytest.raises(ConfigError, match="too long"):
        check_patterns_finish(
            LoraConfig(r=4, alpha_pattern={r"(\w|\w)*z": 8}), names, timeout_s=1.0
        )
    assert time.monotonic() - started < 5.0
