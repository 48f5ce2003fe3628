"""tuneserve.data.rows: dataset validation, JSONL reading, path confinement, snapshots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tuneserve.data.rows import (
    read_jsonl,
    read_snapshot,
    resolve_dataset_path,
    resolve_under_roots,
    validate_rows,
    write_snapshot,
)
from tuneserve.errors import InvalidArgument
from tuneserve.jobs.model import DatasetFormat

PREFIX = "dataset.inline.rows"


def validate(rows: list[dict[str, Any]], max_rows: int = 100) -> Any:
    return validate_rows(rows, field_prefix=PREFIX, max_rows=max_rows)


# --- validate_rows


def test_text_rows_are_accepted_and_extra_keys_dropped() -> None:
    form, clean = validate([{"text": "a b"}, {"text": "c", "prompt": "", "meta": 1}])
    assert form is DatasetFormat.TEXT
    assert clean == [{"text": "a b"}, {"text": "c"}]


def test_prompt_response_rows_are_accepted() -> None:
    rows = [{"prompt": "Q1", "response": "A1"}, {"prompt": "Q2", "response": "A2", "text": ""}]
    form, clean = validate(rows)
    assert form is DatasetFormat.PROMPT_RESPONSE
    assert clean == [{"prompt": "Q1", "response": "A1"}, {"prompt": "Q2", "response": "A2"}]


def test_mixed_forms_are_rejected_naming_the_row() -> None:
    rows = [{"text": "a"}, {"text": "b"}, {"prompt": "q", "response": "r"}]
    with pytest.raises(InvalidArgument) as info:
        validate(rows)
    assert info.value.row == 2
    assert info.value.field == f"{PREFIX}[2]"
    assert "same form" in info.value.message


def test_row_with_both_text_and_prompt_response_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"text": "t", "prompt": "q", "response": "r"}])
    assert info.value.row == 0
    assert info.value.field == f"{PREFIX}[0].text"


def test_missing_response_names_the_field_and_row() -> None:
    rows = [{"prompt": "q", "response": "r"}] * 2 + [{"prompt": "q"}]
    with pytest.raises(InvalidArgument) as info:
        validate(rows)
    assert info.value.field == "dataset.inline.rows[2].response"
    assert info.value.row == 2
    assert "dataset.inline.rows[2].response" in info.value.message


def test_empty_response_counts_as_missing() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"prompt": "q", "response": ""}])
    assert info.value.field == f"{PREFIX}[0].response"


def test_missing_prompt_names_the_prompt_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"prompt": "q", "response": "r"}, {"response": "r"}])
    assert info.value.field == f"{PREFIX}[1].prompt"
    assert info.value.row == 1


def test_empty_row_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"text": "ok"}, {}])
    assert info.value.row == 1


@pytest.mark.parametrize("value", [3, 1.5, ["a"], {"a": "b"}, True])
def test_non_string_values_are_rejected(value: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"text": "ok"}, {"text": value}])
    assert info.value.field == f"{PREFIX}[1].text"
    assert info.value.row == 1
    assert "must be a string" in info.value.message


def test_empty_dataset_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([])
    assert info.value.field == PREFIX
    assert "no rows" in info.value.message


def test_too_many_rows_is_rejected() -> None:
    validate([{"text": "x"}] * 3, max_rows=3)
    with pytest.raises(InvalidArgument) as info:
        validate([{"text": "x"}] * 4, max_rows=3)
    assert info.value.field == PREFIX
    assert "limit of 3" in info.value.message


# --- chat rows

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is your father?"},
    {"role": "assistant", "content": "I am your father."},
]


def test_chat_rows_are_accepted_and_extra_keys_dropped() -> None:
    rows = [
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "Hi", "name": "luke"}, CHAT[2]], "meta": 1},
    ]
    form, clean = validate(rows)
    assert form is DatasetFormat.CHAT
    assert clean == [
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "Hi"}, CHAT[2]]},
    ]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "wookiee", "content": "Hi"}, "role"),
        ({"content": "Hi"}, "role"),
        ({"role": "user", "content": ""}, "content"),
        ({"role": "user"}, "content"),
        ({"role": "user", "content": 3}, "content"),
    ],
)
def test_bad_message_names_the_message_field_and_row(message: dict[str, Any], field: str) -> None:
    rows = [{"messages": CHAT}, {"messages": [CHAT[1], message, CHAT[2]]}]
    with pytest.raises(InvalidArgument) as info:
        validate(rows)
    assert info.value.field == f"{PREFIX}[1].messages[1].{field}"
    assert info.value.row == 1
    assert f"{PREFIX}[1].messages[1].{field}" in info.value.message


def test_message_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"messages": [CHAT[1], "I am your father."]}])
    assert info.value.field == f"{PREFIX}[0].messages[1]"
    assert info.value.row == 0


@pytest.mark.parametrize("messages", [{"role": "user"}, "hello"])
def test_messages_must_be_a_list(messages: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"messages": messages}])
    assert info.value.field == f"{PREFIX}[0].messages"
    assert "non-empty list" in info.value.message


def test_conversation_without_an_assistant_turn_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"messages": CHAT}, {"messages": CHAT[:2]}])
    assert info.value.field == f"{PREFIX}[1].messages"
    assert info.value.row == 1
    assert "no assistant turn" in info.value.message


@pytest.mark.parametrize("other", [{"text": "t"}, {"prompt": "q", "response": "r"}, {"label": "a"}])
def test_messages_with_other_fields_are_rejected(other: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"messages": CHAT}, {"messages": CHAT, **other}])
    assert info.value.field == f"{PREFIX}[1].messages"
    assert info.value.row == 1
    assert "one form" in info.value.message


def test_chat_rows_mixed_with_text_rows_are_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"messages": CHAT}, {"text": "plain"}])
    assert info.value.row == 1
    assert "same form" in info.value.message


# --- labelled rows


def test_labelled_rows_are_accepted() -> None:
    form, clean = validate(
        [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg", "prompt": ""}]
    )
    assert form is DatasetFormat.LABELLED
    assert clean == [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]


def test_integer_labels_are_accepted_as_strings() -> None:
    form, clean = validate([{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    assert form is DatasetFormat.LABELLED
    assert clean == [{"text": "good", "label": "1"}, {"text": "bad", "label": "0"}]


@pytest.mark.parametrize("label", [True, 1.0, ["a"]])
def test_other_label_types_are_rejected(label: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"text": "good", "label": label}])
    assert info.value.field == f"{PREFIX}[0].label"
    assert "must be a string" in info.value.message


@pytest.mark.parametrize(
    "row",
    [{"label": "pos"}, {"text": "", "label": "pos"}, {"prompt": "q", "response": "r", "label": 1}],
)
def test_label_without_text_is_rejected(row: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"text": "good", "label": "pos"}, row])
    assert info.value.field == f"{PREFIX}[1].text"
    assert info.value.row == 1


def test_labelled_and_text_rows_do_not_mix() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate([{"text": "good", "label": "pos"}, {"text": "no label"}])
    assert info.value.row == 1
    assert "same form" in info.value.message


# --- read_jsonl


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_jsonl_reads_objects(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', '{"prompt": "q", "response": "r"}'])
    rows = read_jsonl(path, max_bytes=10_000, max_rows=10)
    assert rows == [{"text": "a"}, {"prompt": "q", "response": "r"}]


def test_read_jsonl_bad_json_names_row_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": '])
    with pytest.raises(InvalidArgument) as info:
        read_jsonl(path, max_bytes=10_000, max_rows=10)
    assert info.value.row == 2
    assert info.value.field == "dataset.path"
    assert "row 2 (line 3)" in info.value.message
    assert "not valid JSON" in info.value.message


def test_read_jsonl_rejects_a_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', '["text", "b"]'])
    with pytest.raises(InvalidArgument) as info:
        read_jsonl(path, max_bytes=10_000, max_rows=10)
    assert info.value.row == 1
    assert "row 1 (line 2) is not a JSON object" in info.value.message


def test_read_jsonl_enforces_the_size_limit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "' + "x" * 100 + '"}'])
    size = path.stat().st_size
    assert len(read_jsonl(path, max_bytes=size, max_rows=10)) == 1
    with pytest.raises(InvalidArgument) as info:
        read_jsonl(path, max_bytes=size - 1, max_rows=10)
    assert f"over the limit of {size - 1}" in info.value.message


def test_read_jsonl_enforces_the_row_limit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}'] * 4)
    assert len(read_jsonl(path, max_bytes=10_000, max_rows=4)) == 4
    with pytest.raises(InvalidArgument, match="more than 3 rows"):
        read_jsonl(path, max_bytes=10_000, max_rows=3)


def test_read_jsonl_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidArgument, match="not UTF-8") as info:
        read_jsonl(path, max_bytes=10_000, max_rows=10)
    assert info.value.row == 1  # the row is named, not only the file
    assert "line 2" in info.value.message


# --- resolve_dataset_path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root.resolve()


def test_file_inside_a_root_resolves_to_its_real_path(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    f = root / "sub" / "d.jsonl"
    f.parent.mkdir()
    f.write_text("{}\n")
    assert resolve_dataset_path(str(f), [other.resolve(), root]) == f


def test_file_outside_the_roots_is_rejected(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    with pytest.raises(InvalidArgument) as info:
        resolve_dataset_path(str(outside), [root])
    assert info.value.field == "dataset.path"
    assert "outside the allowed dataset roots" in info.value.message


def test_dot_dot_cannot_escape_a_root(root: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.jsonl").write_text("{}\n")
    with pytest.raises(InvalidArgument, match="outside"):
        resolve_dataset_path(f"{root}/../secret.jsonl", [root])


def test_sibling_directory_with_root_as_name_prefix_is_outside(root: Path) -> None:
    sibling = root.parent / (root.name + "2")
    sibling.mkdir()
    (sibling / "d.jsonl").write_text("{}\n")
    with pytest.raises(InvalidArgument, match="outside"):
        resolve_dataset_path(str(sibling / "d.jsonl"), [root])


def test_symlink_inside_a_root_pointing_outside_is_rejected(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    link = root / "link.jsonl"
    link.symlink_to(outside)
    with pytest.raises(InvalidArgument, match="outside"):
        resolve_dataset_path(str(link), [root])


def test_no_roots_configured_rejects_every_path(root: Path) -> None:
    f = root / "d.jsonl"
    f.write_text("{}\n")
    with pytest.raises(InvalidArgument) as info:
        resolve_dataset_path(str(f), [])
    assert info.value.field == "dataset.path"
    assert "--dataset-roots" in info.value.message


@pytest.mark.parametrize("name", ["a-directory", "missing.jsonl"])
def test_non_file_is_rejected(root: Path, name: str) -> None:
    (root / "a-directory").mkdir()
    with pytest.raises(InvalidArgument, match="is not a file"):
        resolve_dataset_path(str(root / name), [root])


# --- snapshots


def test_snapshot_round_trip(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Line one\nline two", "response": 'caf\u00e9 \u2603 "quoted"'},
        {"prompt": "{}", "response": "\\n is not a newline"},
    ]
    path = tmp_path / "datasets" / "job.jsonl"  # the parent does not exist yet
    write_snapshot(rows, path)
    assert read_snapshot(path) == rows
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    assert [p.name for p in path.parent.iterdir()] == ["job.jsonl"]  # no temporary left


def test_snapshot_overwrites_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "job.jsonl"
    write_snapshot([{"text": "old"}, {"text": "older"}], path)
    write_snapshot([{"text": "new"}], path)
    assert read_snapshot(path) == [{"text": "new"}]
    assert json.loads(path.read_text()) == {"text": "new"}


# --- resolve_under_roots for directories (adapter imports)


def resolve_dir(path: Path | str, roots: list[Path]) -> Path:
    return resolve_under_roots(
        str(path),
        roots,
        field="path",
        what="adapter",
        flag="--adapter-import-roots",
        directory=True,
    )


def test_a_directory_under_a_root_resolves_to_its_real_path(root: Path) -> None:
    adapter = root / "team" / "vader"
    adapter.mkdir(parents=True)
    assert resolve_dir(adapter, [root]) == adapter
    assert resolve_dir(f"{root}/team/../team/vader", [root]) == adapter


@pytest.mark.parametrize("name", ["adapter_config.json", "missing"])
def test_a_file_or_nothing_is_not_a_directory(root: Path, name: str) -> None:
    (root / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidArgument) as info:
        resolve_dir(root / name, [root])
    assert info.value.field == "path"
    assert "is not a directory" in info.value.message


def test_a_directory_outside_the_roots_is_refused_naming_what(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(InvalidArgument) as info:
        resolve_dir(outside, [root])
    assert info.value.field == "path"
    assert info.value.message.startswith("path: ")
    assert "outside the allowed adapter roots" in info.value.message


def test_a_symlinked_directory_escaping_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret-adapter"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    link = root / "vader"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="outside the allowed adapter roots"):
        resolve_dir(link, [root])


def test_a_symlinked_directory_inside_the_root_resolves_to_its_target(root: Path) -> None:
    target = root / "adapters" / "vader-v2"
    target.mkdir(parents=True)
    (root / "vader").symlink_to(target, target_is_directory=True)
    assert resolve_dir(root / "vader", [root]) == target


def test_no_roots_names_what_and_the_flag(root: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_dir(root, [])
    assert info.value.field == "path"
    assert "reads no adapter files" in info.value.message
    assert "--adapter-import-roots" in info.value.message


@pytest.mark.parametrize(
    "bad", ["with\0nul.jsonl", "x" * 300 + "/d.jsonl", "x" * 300 + ".jsonl", "/" + "a" * 5000]
)
def test_paths_the_file_system_cannot_take_are_invalid_arguments(root: Path, bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_dataset_path(str(root / bad), [root])
    assert info.value.field == "dataset.path"
    assert len(info.value.message) < 400


def test_directory_roots_refuse_bad_paths_too(root: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_under_roots(
            str(root / ("y" * 300)),
            [root],
            field="path",
            what="adapter",
            flag="--adapter-import-roots",
            directory=True,
        )
    assert info.value.field == "path"
