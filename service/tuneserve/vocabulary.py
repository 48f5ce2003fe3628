"""The service's shared vocabulary, at the bottom of the tree: what every layer (api, jobs,
data, training, registry, inference) names the same way. Adapter ids, tasks, dataset
formats, what a fine-tune is asked to do (`JobSpec`: LoRA and training settings, validated
all at once) and how far it got (`Progress`). Plain dataclasses, serialised to JSON for the
store; no grpc, no torch, nothing above it imported."""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from tuneserve.errors import InvalidArgument, collect, shown

ADAPTER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
SCHEDULERS = ("linear", "cosine", "constant")
MAX_SEED = 2**63 - 1  # torch seeds and the store's integers are signed 64-bit
MAX_LORA_ALPHA = 65536.0


def check_adapter_id(adapter_id: str, *, field_name: str = "adapter_id") -> str:
    """Adapter ids are names, never paths: they become one directory under the registry."""
    if not ADAPTER_ID_RE.match(adapter_id) or ".." in adapter_id:
        raise InvalidArgument(
            f"{field_name}: {shown(adapter_id)} is not a valid adapter id (lowercase letters, "
            "digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters)",
            field=field_name,
        )
    return adapter_id


class DatasetFormat(str, enum.Enum):
    TEXT = "text"  # loss on every token
    PROMPT_RESPONSE = "prompt_response"  # loss on the response only
    LABELLED = "labelled"  # text with a label, for sequence classification
    CHAT = "chat"  # messages of role and content, rendered with a chat template


class Task(str, enum.Enum):
    CAUSAL_LM = "causal_lm"
    CLASSIFICATION = "classification"


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    r: int = 8
    alpha: float = 0.0  # 0 means 2 * r
    dropout: float = 0.05
    # Empty means every linear layer but the output head (peft's "all-linear").
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False  # scale by alpha / sqrt(r)
    use_dora: bool = False  # weight-decomposed LoRA

    def resolved(self) -> LoraSpec:
        return dataclasses.replace(self, alpha=self.alpha or 2.0 * self.r)


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    epochs: int = 3
    max_steps: int = 0  # 0: the epochs decide
    learning_rate: float = 2e-4
    batch_size: int = 8
    max_seq_length: int = 512
    seed: int = 0
    warmup_steps: int | None = None  # None: 5% of the steps
    scheduler: str = "linear"  # after warmup: linear, cosine or constant
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    eval_fraction: float = 0.0  # held out when no validation rows are given
    eval_every_steps: int = 0  # 0: at the end of each epoch
    checkpoint_every_steps: int = 0  # 0: about every 10% of the run
    gradient_checkpointing: bool = False
    loss_on: str = "completion"  # "completion" (response only) or "all"
    group_by_length: bool = True  # batch rows of similar length: far less padding
    # Lay a micro-batch's rows end to end in rows of max_seq_length, attention confined to
    # each (padding-free); off: pad each micro-batch to its longest row. Same rows per step,
    # same targets, so the schedule and epochs mean the same either way.
    packing: bool = False


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """Everything needed to run the job again after a restart."""

    base_model: str
    adapter_id: str
    dataset_format: DatasetFormat
    dataset_rows: int
    lora: LoraSpec = field(default_factory=LoraSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    request_id: str = ""
    parent_adapter_id: str = ""  # continue training this adapter
    validation_rows: int = 0
    task: Task = Task.CAUSAL_LM
    labels: tuple[str, ...] = ()  # classification: label names in the head's order
    chat_template: str = ""  # chat rows: Jinja template; empty: the tokenizer's
    # Who submitted it (a fingerprint of the bearer token, "" without tokens): the queue
    # bounds each caller's share.
    caller: str = ""
    # sha256 of the request as submitted: a reused request_id must come with the same one.
    request_fingerprint: str = ""

    def validate(self) -> JobSpec:
        """Report every problem at once; return the spec with defaults resolved."""
        problems: list[InvalidArgument] = []

        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                problems.append(InvalidArgument(f"{name}: {message}", field=name))

        try:
            check_adapter_id(self.adapter_id)
        except InvalidArgument as e:
            problems.append(e)
        lora, tr = self.lora, self.training
        check(1 <= lora.r <= 1024, "lora.r", f"{lora.r} is not between 1 and 1024")
        check(
            0 <= lora.alpha <= MAX_LORA_ALPHA,  # False for NaN
            "lora.alpha",
            f"{lora.alpha} is not between 0 (2 * r) and {MAX_LORA_ALPHA:g}",
        )
        check(0 <= lora.dropout < 1, "lora.dropout", f"{lora.dropout} is not in [0, 1)")
        check(
            not (lora.use_dora and self.task is Task.CAUSAL_LM),
            "lora.use_dora",
            "DoRA adapters cannot be served batched with other adapters, so a text-generation "
            "job cannot use them; train plain LoRA (DoRA is allowed for classification)",
        )
        check(len(lora.target_modules) <= 256, "lora.target_modules", "at most 256 names")
        for i, name in enumerate(lora.target_modules[:256]):
            check(
                bool(re.match(r"^[A-Za-z0-9_.]{1,256}$", name)),
                f"lora.target_modules[{i}]",
                f"{shown(name)} is not a module name",
            )
        check(1 <= tr.epochs <= 1000, "training.epochs", f"{tr.epochs} is not between 1 and 1000")
        check(0 <= tr.max_steps <= 10_000_000, "training.max_steps", "is out of range")
        check(
            0 < tr.learning_rate < 1,
            "training.learning_rate",
            f"{tr.learning_rate} is not in (0, 1)",
        )
        check(1 <= tr.batch_size <= 4096, "training.batch_size", "is not between 1 and 4096")
        check(
            8 <= tr.max_seq_length <= 1_048_576,
            "training.max_seq_length",
            f"{tr.max_seq_length} is not between 8 and 1048576",
        )
        check(
            tr.warmup_steps is None or tr.warmup_steps >= 0,
            "training.warmup_steps",
            "must not be negative",
        )
        check(
            0 <= tr.seed <= MAX_SEED,
            "training.seed",
            f"{tr.seed} is out of range: give 0 to 2**63 - 1 ({MAX_SEED})",
        )
        check(len(self.request_id) <= 128, "request_id", "is longer than 128 characters")
        check(
            tr.scheduler in SCHEDULERS,
            "training.scheduler",
            f"{shown(tr.scheduler)} is not one of {', '.join(SCHEDULERS)}",
        )
        check(0 <= tr.weight_decay < 1, "training.weight_decay", "is not in [0, 1)")
        check(
            1 <= tr.gradient_accumulation_steps <= 1024,
            "training.gradient_accumulation_steps",
            "is not between 1 and 1024",
        )
        check(0 <= tr.eval_fraction < 1, "training.eval_fraction", "is not in [0, 1)")
        check(tr.eval_every_steps >= 0, "training.eval_every_steps", "must not be negative")
        check(
            tr.checkpoint_every_steps >= 0,
            "training.checkpoint_every_steps",
            "must not be negative",
        )
        check(
            tr.loss_on in ("completion", "all"),
            "training.loss_on",
            f"{shown(tr.loss_on)} is not completion or all",
        )
        if self.parent_adapter_id:
            try:
                check_adapter_id(self.parent_adapter_id, field_name="parent_adapter_id")
            except InvalidArgument as e:
                problems.append(e)
        collect(problems)
        return dataclasses.replace(self, lora=lora.resolved())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        return cls(
            base_model=d["base_model"],
            adapter_id=d["adapter_id"],
            dataset_format=DatasetFormat(d["dataset_format"]),
            dataset_rows=d["dataset_rows"],
            lora=LoraSpec(**{**d["lora"], "target_modules": tuple(d["lora"]["target_modules"])}),
            training=TrainingSpec(**d["training"]),
            request_id=d.get("request_id", ""),
            parent_adapter_id=d.get("parent_adapter_id", ""),
            validation_rows=d.get("validation_rows", 0),
            task=Task(d.get("task", Task.CAUSAL_LM.value)),
            labels=tuple(d.get("labels", ())),
            chat_template=d.get("chat_template", ""),
            caller=d.get("caller", ""),
            request_fingerprint=d.get("request_fingerprint", ""),
        )


@dataclass(kw_only=True)
class Progress:
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    total_epochs: float = 0.0
    loss: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = 0.0
    trained_tokens: int = 0  # non-pad tokens through the model, prompts included
    eval_loss: float = 0.0  # at the last evaluation
    eval_step: int = 0  # the step of the last evaluation (0: none yet)
    eval_accuracy: float = 0.0  # classification
    eval_matthews_correlation: float = 0.0  # classification
    resumed_from_step: int = 0  # the checkpoint this run started from
    mfu: float = 0.0  # model FLOPs utilisation on a GPU; 0 on a CPU

    @property
    def fraction_done(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0
