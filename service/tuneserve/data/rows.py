"""Dataset rows: read from the request or from a JSONL file under an allowed root, and
validated before a job is queued. Every error names the row and the field."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tuneserve.errors import InvalidArgument, shown
from tuneserve.vocabulary import DatasetFormat

# One validated row: {"text"}, {"prompt", "response"}, {"text", "label"} or {"messages"}.
Row = dict[str, Any]
ROLES = ("system", "user", "assistant")
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def resolve_dataset_path(path: str, roots: Sequence[Path], *, field: str = "dataset.path") -> Path:
    """The real path of `path` if it lies under one of `roots`; symlinks cannot escape."""
    return resolve_under_roots(path, roots, field=field, what="dataset", flag="--dataset-roots")


def resolve_under_roots(
    path: str,
    roots: Sequence[Path],
    *,
    field: str,
    what: str,
    flag: str,
    directory: bool = False,
) -> Path:
    """The real path of `path` if it lies under one of `roots`; symlinks cannot escape."""
    if not roots:
        raise InvalidArgument(
            f"{field}: this server reads no {what} files (start it with {flag})", field=field
        )
    if "\0" in path or len(path) > MAX_PATH_CHARS:
        raise InvalidArgument(
            f"{field}: not a path (a NUL character, or over {MAX_PATH_CHARS} characters)",
            field=field,
        )
    kind = "directory" if directory else "file"
    try:
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in roots):
            raise InvalidArgument(
                f"{field}: {shown(path)} is outside the allowed {what} roots", field=field
            )
        if not (real.is_dir() if directory else real.is_file()):
            raise InvalidArgument(f"{field}: {shown(path)} is not a {kind}", field=field)
    except OSError as e:  # a name too long for the file system, a loop of links, ...
        raise InvalidArgument(
            f"{field}: {shown(path)} cannot be a {kind} here: {e.strerror or e}", field=field
        ) from None
    return real


def read_jsonl(
    path: Path, *, max_bytes: int, max_rows: int, field: str = "dataset.path"
) -> list[Mapping[str, Any]]:
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidArgument(
            f"{field}: {size} bytes is over the limit of {max_bytes}", field=field
        )
    rows: list[Mapping[str, Any]] = []
    with path.open("rb") as f:
        for index, line in enumerate(_lines(f, field)):
            if not line.strip():
                raise InvalidArgument(
                    f"{field}: row {index} (line {index + 1}) is empty",
                    field=field,
                    row=index,
                )
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(
                    f"{field}: row {index} (line {index + 1}) is not valid JSON: {e.msg}",
                    field=field,
                    row=index,
                ) from None
            if not isinstance(obj, dict):
                raise InvalidArgument(
                    f"{field}: row {index} (line {index + 1}) is not a JSON object",
                    field=field,
                    row=index,
                )
            rows.append(obj)
            if len(rows) > max_rows:
                raise InvalidArgument(f"{field}: more than {max_rows} rows", field=field)
    return rows


def _lines(f: Iterable[bytes], field: str) -> Iterable[str]:
    """Each line as text; a line that is not UTF-8 is named by its row, line and byte."""
    for index, raw in enumerate(f):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise InvalidArgument(
                f"{field}: row {index} (line {index + 1}) is not UTF-8 text "
                f"(byte {e.start + 1} of the line)",
                field=field,
                row=index,
            ) from None


def validate_rows(
    rows: Sequence[Mapping[str, Any]], *, field_prefix: str, max_rows: int
) -> tuple[DatasetFormat, list[Row]]:
    """Check every row has one form and non-empty strings; return the form and clean rows.

    `field_prefix` names the rows in errors: "dataset.inline.rows" gives
    "dataset.inline.rows[3].response"."""
    if not rows:
        raise InvalidArgument(f"{field_prefix}: the dataset has no rows", field=field_prefix)
    if len(rows) > max_rows:
        raise InvalidArgument(
            f"{field_prefix}: {len(rows)} rows is over the limit of {max_rows}",
            field=field_prefix,
        )
    form: DatasetFormat | None = None
    clean: list[Row] = []
    for index, row in enumerate(rows):
        where = f"{field_prefix}[{index}]"
        row_form = _row_form(row, where, index)
        if form is None:
            form = row_form
        elif row_form != form:
            raise InvalidArgument(
                f"{where}: is a {row_form.value} row but row 0 is a {form.value} row; "
                "all rows must have the same form",
                field=where,
                row=index,
            )
        if row_form is DatasetFormat.CHAT:
            clean.append({"messages": _messages(row["messages"], where, index)})
        else:
            clean.append({k: str(row[k]) for k in _KEYS[row_form]})
    assert form is not None
    return form, clean


_KEYS = {
    DatasetFormat.TEXT: ("text",),
    DatasetFormat.PROMPT_RESPONSE: ("prompt", "response"),
    DatasetFormat.LABELLED: ("text", "label"),
}


def _messages(messages: Any, where: str, index: int) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(
            f"{where}.messages: must be a non-empty list", field=f"{where}.messages", row=index
        )
    clean = []
    for i, m in enumerate(messages):
        at = f"{where}.messages[{i}]"
        if not isinstance(m, Mapping):
            raise InvalidArgument(f"{at}: must be an object", field=at, row=index)
        if m.get("role") not in ROLES:
            raise InvalidArgument(
                f"{at}.role: {m.get('role')!r} is not one of {', '.join(ROLES)}",
                field=f"{at}.role",
                row=index,
            )
        if not isinstance(m.get("content"), str) or not m["content"]:
            raise InvalidArgument(
                f"{at}.content: must be a non-empty string", field=f"{at}.content", row=index
            )
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise InvalidArgument(
            f"{where}.messages: has no assistant turn to learn from",
            field=f"{where}.messages",
            row=index,
        )
    return clean


def _row_form(row: Mapping[str, Any], where: str, index: int) -> DatasetFormat:
    if row.get("messages") not in (None, [], ""):
        if any(row.get(k) not in (None, "") for k in ("text", "prompt", "response", "label")):
            raise InvalidArgument(
                f"{where}: has messages and other fields; give one form",
                field=f"{where}.messages",
                row=index,
            )
        return DatasetFormat.CHAT
    present = {k for k in ("text", "prompt", "response", "label") if row.get(k) not in (None, "")}
    for key in present:
        label_number = key == "label" and type(row[key]) is int  # CoLA-style 0/1 labels
        if not isinstance(row[key], str) and not label_number:
            raise InvalidArgument(
                f"{where}.{key}: must be a string, not {type(row[key]).__name__}",
                field=f"{where}.{key}",
                row=index,
            )
    if present == {"text"}:
        return DatasetFormat.TEXT
    if present == {"text", "label"}:
        return DatasetFormat.LABELLED
    if "label" in present:
        raise InvalidArgument(
            f"{where}.text: a labelled row needs a non-empty text (and no prompt/response)",
            field=f"{where}.text",
            row=index,
        )
    if present == {"prompt", "response"}:
        return DatasetFormat.PROMPT_RESPONSE
    if "text" in present:
        raise InvalidArgument(
            f"{where}: has both text and prompt/response; give one or the other",
            field=f"{where}.text",
            row=index,
        )
    if "prompt" in present:
        raise InvalidArgument(
            f"{where}.response: is missing or empty", field=f"{where}.response", row=index
        )
    if "response" in present:
        raise InvalidArgument(
            f"{where}.prompt: is missing or empty", field=f"{where}.prompt", row=index
        )
    raise InvalidArgument(
        f"{where}: needs a non-empty text, a prompt and response, or messages",
        field=f"{where}.text",
        row=index,
    )


def write_snapshot(rows: Sequence[Row], path: Path) -> None:
    """Atomically write the validated rows, so a restarted job trains on the same data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_snapshot(path: Path) -> list[Row]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
