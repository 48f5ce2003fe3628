"""Dataset preparation for a fine-tune: the rows a TrainJob gives (inline or a file under
the dataset roots) read within bounds, validated as one format, split into training and
validation rows, their labels fixed for classification, and a chat template checked by
rendering it in a sandboxed worker. Everything a bad dataset can be wrong about is reported
here, at submit time, naming the field and row, never when the job runs."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneserve.data.chat_template import TemplateRenderer
from tuneserve.data.rows import Row, read_jsonl, resolve_dataset_path, validate_rows
from tuneserve.errors import InvalidArgument
from tuneserve.vocabulary import DatasetFormat, Task

MAX_CHAT_TEMPLATE_CHARS = 256 * 1024  # real ones are a few kB


class DatasetRequest(Protocol):
    """The dataset half of a TrainJob (tuneserve.jobs.manager.TrainRequest is one). Exactly
    one of `rows` and `dataset_path`; at most one of `validation_rows` and
    `validation_path`."""

    @property
    def rows(self) -> Sequence[dict[str, Any]] | None: ...
    @property
    def dataset_path(self) -> str | None: ...
    @property
    def validation_rows(self) -> Sequence[dict[str, Any]] | None: ...
    @property
    def validation_path(self) -> str | None: ...
    @property
    def task(self) -> Task: ...
    @property
    def labels(self) -> tuple[str, ...]: ...
    @property
    def chat_template(self) -> str: ...


@dataclass(frozen=True, kw_only=True)
class DatasetLimits:
    dataset_roots: tuple[Path, ...] = ()
    max_dataset_rows: int = 100_000
    max_dataset_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class PreparedDataset:
    format: DatasetFormat
    rows: list[Row]
    validation: list[Row]
    labels: tuple[str, ...]  # classification: in the head's order


class DatasetPreparer:
    """Thread-safe: `prepare` may be called from many threads at once."""

    def __init__(
        self,
        *,
        limits: DatasetLimits,
        chat_renderer: TemplateRenderer,
        base_chat_template: Callable[[], str | None] = lambda: None,
        base_special_tokens: Callable[[], Mapping[str, str]] = lambda: {},
    ) -> None:
        self._limits = limits
        self._chat_renderer = chat_renderer
        self._base_chat_template = base_chat_template
        self._base_special_tokens = base_special_tokens

    def prepare(
        self,
        request: DatasetRequest,
        *,
        eval_fraction: float,
        seed: int,
        parent_labels: tuple[str, ...] | None = None,
    ) -> PreparedDataset:
        """`parent_labels`: a continued classifier keeps its parent's labels."""
        dataset_format, rows = self._load_rows(request)
        all_rows = rows
        rows, validation = self._split_validation(
            request, eval_fraction, seed, dataset_format, rows
        )
        given = validation if len(rows) == len(all_rows) else []  # not a held-out share
        # Labels are checked on the rows as the caller numbered them, before any split.
        labels = self._labels(request, dataset_format, all_rows, given, parent_labels)
        if dataset_format is DatasetFormat.CHAT:
            self._check_chat_template(request.chat_template, rows[0]["messages"])
        return PreparedDataset(dataset_format, rows, validation, labels)

    # --- internals

    def _load_rows(self, request: DatasetRequest) -> tuple[DatasetFormat, list[Row]]:
        limits = self._limits
        if (request.rows is None) == (request.dataset_path is None):
            raise InvalidArgument(
                "dataset: give inline rows or a path, exactly one", field="dataset"
            )
        if request.dataset_path is not None:
            path = resolve_dataset_path(request.dataset_path, limits.dataset_roots)
            raw = read_jsonl(
                path, max_bytes=limits.max_dataset_bytes, max_rows=limits.max_dataset_rows
            )
            prefix = "dataset.path"
        else:
            assert request.rows is not None
            raw, prefix = list(request.rows), "dataset.inline.rows"
        return validate_rows(raw, field_prefix=prefix, max_rows=limits.max_dataset_rows)

    def _check_chat_template(self, template: str, messages: list[dict[str, str]]) -> None:
        """Chat rows need a template that renders; checked now, not at training time."""
        if not template and not self._base_chat_template():
            raise InvalidArgument(
                "chat_template: the base model's tokenizer has no chat template; give one",
                field="chat_template",
            )
        if len(template) > MAX_CHAT_TEMPLATE_CHARS:
            raise InvalidArgument(
                f"chat_template: {len(template)} characters is over the limit of "
                f"{MAX_CHAT_TEMPLATE_CHARS}",
                field="chat_template",
            )
        if template:
            # Rendered in a worker process under time, memory and output bounds, as
            # transformers renders it: a template is a program, never run on our threads.
            self._chat_renderer.check(
                template, messages, special_tokens=self._base_special_tokens()
            )

    def _labels(
        self,
        request: DatasetRequest,
        dataset_format: DatasetFormat,
        rows: list[Row],
        validation: list[Row],
        parent_labels: tuple[str, ...] | None,
    ) -> tuple[str, ...]:
        """Classification needs labelled rows and fixes the label order of the head."""
        labelled = dataset_format is DatasetFormat.LABELLED
        if request.task is not Task.CLASSIFICATION:
            if request.labels:
                raise InvalidArgument(
                    "labels: only sequence classification jobs take labels; set the task, "
                    "or leave labels empty",
                    field="labels",
                )
            if labelled:
                raise InvalidArgument(
                    "task: the rows have labels; set the task to sequence classification",
                    field="task",
                )
            return ()
        if not labelled:
            raise InvalidArgument(
                "dataset: sequence classification needs rows of text and label",
                field="dataset",
            )
        if parent_labels is not None:
            labels = parent_labels
        else:
            labels = tuple(request.labels) or tuple(sorted({r["label"] for r in rows}))
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise InvalidArgument(
                f"labels: need at least two distinct labels, got {list(labels)}", field="labels"
            )
        known = set(labels)
        train_prefix = "dataset.path" if request.dataset_path is not None else "dataset.inline.rows"
        val_prefix = (
            "validation.path" if request.validation_path is not None else "validation.inline.rows"
        )
        for prefix, split_rows in ((train_prefix, rows), (val_prefix, validation)):
            for index, row in enumerate(split_rows):
                if row["label"] not in known:
                    raise InvalidArgument(
                        f"{prefix}[{index}].label: {row['label']!r} is not one of {list(labels)}",
                        field=f"{prefix}[{index}].label",
                        row=index,
                    )
        return labels

    def _split_validation(
        self,
        request: DatasetRequest,
        eval_fraction: float,
        seed: int,
        dataset_format: DatasetFormat,
        rows: list[Row],
    ) -> tuple[list[Row], list[Row]]:
        """Given validation rows, or `eval_fraction` of the rows held out (seeded)."""
        limits = self._limits
        if request.validation_rows is not None or request.validation_path is not None:
            if request.validation_path is not None:
                path = resolve_dataset_path(
                    request.validation_path, limits.dataset_roots, field="validation.path"
                )
                raw = read_jsonl(
                    path,
                    max_bytes=limits.max_dataset_bytes,
                    max_rows=limits.max_dataset_rows,
                    field="validation.path",
                )
                prefix = "validation.path"
            else:
                assert request.validation_rows is not None
                raw, prefix = list(request.validation_rows), "validation.inline.rows"
            form, validation = validate_rows(
                raw, field_prefix=prefix, max_rows=limits.max_dataset_rows
            )
            if form is not dataset_format:
                raise InvalidArgument(
                    f"{prefix}: {form.value} rows, but the training rows are "
                    f"{dataset_format.value} rows",
                    field=prefix,
                )
            return rows, validation
        fraction = eval_fraction
        if fraction <= 0:
            return rows, []
        held = max(1, round(len(rows) * fraction))
        if held >= len(rows):
            raise InvalidArgument(
                f"training.eval_fraction: {fraction} of {len(rows)} rows leaves none to train on",
                field="training.eval_fraction",
            )
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held_out = set(order[:held])
        return (
            [r for i, r in enumerate(rows) if i not in held_out],
            [r for i, r in enumerate(rows) if i in held_out],
        )
