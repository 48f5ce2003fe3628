"""tuneserve.storage.artifacts: one suite over both backends, the local directory and S3
spoken over real HTTP to moto's server (tests/s3server.py), then what only S3 has: the
marker, its errors, and the client made from the environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber

from tests.s3server import S3Endpoint, s3_endpoint  # noqa: F401
from tuneserve.errors import FailedPrecondition, InvalidArgument, Unavailable
from tuneserve.storage.artifacts import (
    MARKER,
    ArtifactStore,
    LocalArtifactStore,
    S3ArtifactStore,
    open_artifact_store,
)

TREE = {
    "adapter_config.json": b'{"r": 4, "lora_alpha": 8}',
    "adapter_model.safetensors": bytes(range(256)) * 64,
    "nested/deeper/.hidden": b"\x00\xff\x00\r\n",
    "nested/empty.bin": b"",
}
BAD_KEYS = ["", "/abs", "a/../b", "..", "a\\b", "a\x00b", "a//b", "a/", "./a", "a/.tmp"]


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    return S3ArtifactStore(endpoint.make_bucket(), "some/prefix", client=endpoint.client())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "source", TREE)


def test_round_trip_keeps_every_file_and_byte(
    store: ArtifactStore, source: Path, tmp_path: Path
) -> None:
    key = "adapters/my-adapter/3f2a9c"
    assert not store.exists(key)
    assert store.put_dir(key, source) == sum(len(b) for b in TREE.values())
    assert store.exists(key)
    store.get_dir(key, tmp_path / "out")
    assert read_tree(tmp_path / "out") == TREE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    local = store.local_path(key)
    if isinstance(store, LocalArtifactStore):
        assert local == store.root / key and read_tree(local) == TREE
    else:
        assert local is None


def test_large_file_goes_up_and_down_whole(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(9 << 20)  # above boto3's 8 MiB threshold: a multipart upload
    write_tree(tmp_path / "big", {"model.safetensors": data})
    assert store.put_dir("checkpoints/job-1/0001-00000040", tmp_path / "big") == len(data)
    store.get_dir("checkpoints/job-1/0001-00000040", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == data


def test_a_key_is_written_once(store: ArtifactStore, source: Path, tmp_path: Path) -> None:
    store.put_dir("datasets/job-1", source)
    other = write_tree(tmp_path / "other", {"adapter_config.json": b"{}"})
    with pytest.raises(FileExistsError):
        store.put_dir("datasets/job-1", other)
    store.get_dir("datasets/job-1", tmp_path / "out")
    assert read_tree(tmp_path / "out") == TREE


def test_an_absent_key_is_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    assert not store.exists("adapters/nobody/1")
    with pytest.raises(FileNotFoundError):
        store.get_dir("adapters/nobody/1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if isinstance(store, LocalArtifactStore):
        with pytest.raises(FileNotFoundError):
            store.local_path("adapters/nobody/1")


def test_get_dir_needs_a_new_destination_under_an_existing_parent(
    store: ArtifactStore, source: Path, tmp_path: Path
) -> None:
    store.put_dir("k/1", source)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        store.get_dir("k/1", tmp_path / "taken")
    with pytest.raises(FileNotFoundError):
        store.get_dir("k/1", tmp_path / "no" / "parent")


def write_incomplete(store: ArtifactStore, key: str, tmp_path: Path) -> None:
    """What a writer that died mid-upload leaves behind."""
    if isinstance(store, S3ArtifactStore):  # the files went up, the marker never did
        client = store._client
        for rel, data in TREE.items():
            client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}/{rel}", Body=data)
    else:  # the temporary directory was never renamed into place
        assert isinstance(store, LocalArtifactStore)
        write_tree(store.root / ".tmp" / "0123abcd", TREE)


def test_a_key_without_its_marker_is_absent_and_delete_clears_it(
    store: ArtifactStore, tmp_path: Path
) -> None:
    write_incomplete(store, "adapters/a/1", tmp_path)
    assert not store.exists("adapters/a/1")
    with pytest.raises(FileNotFoundError):
        store.get_dir("adapters/a/1", tmp_path / "out")
    store.delete("adapters/a/1")
    if isinstance(store, S3ArtifactStore):
        listed = store._client.list_objects_v2(Bucket=store.bucket)
        assert listed.get("KeyCount", 0) == 0


def test_delete_removes_the_key_and_is_quiet_when_absent(
    store: ArtifactStore, source: Path, tmp_path: Path
) -> None:
    store.put_dir("adapters/a/1", source)
    store.put_dir("adapters/a/2", source)
    store.delete("adapters/a/1")
    assert not store.exists("adapters/a/1")
    assert store.exists("adapters/a/2")  # a sibling key is untouched
    with pytest.raises(FileNotFoundError):
        store.get_dir("adapters/a/1", tmp_path / "out")
    store.delete("adapters/a/1")
    store.delete("never/written")
    store.put_dir("adapters/a/1", source)  # nothing is left that would block the key
    assert store.exists("adapters/a/1")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_could_escape_the_root_are_refused(
    store: ArtifactStore, source: Path, tmp_path: Path, key: str
) -> None:
    with pytest.raises(ValueError):
        store.put_dir(key, source)
    with pytest.raises(ValueError):
        store.get_dir(key, tmp_path / "out")
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.delete(key)
    with pytest.raises(ValueError):
        store.local_path(key)


def test_put_dir_needs_a_directory(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        store.put_dir("k/1", tmp_path / "missing")


def test_check_passes_on_a_usable_store(store: ArtifactStore) -> None:
    store.check()
    store.check()  # leaves nothing that would make a second start-up fail


def test_local_check_fails_when_the_root_cannot_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(FailedPrecondition, match="not a writable directory"):
        LocalArtifactStore(tmp_path / "file" / "artifacts").check()


def test_s3_objects_live_under_the_prefix(s3_endpoint: S3Endpoint, source: Path) -> None:  # noqa: F811
    bucket = s3_endpoint.make_bucket()
    client = s3_endpoint.client()
    S3ArtifactStore(bucket, "/team/a/", client=client).put_dir("adapters/x/1", source)
    names = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert names == {f"team/a/adapters/x/1/{rel}" for rel in [*TREE, MARKER]}


def test_s3_check_names_a_missing_bucket(s3_endpoint: S3Endpoint) -> None:  # noqa: F811
    store = S3ArtifactStore("no-such-bucket-here", client=s3_endpoint.client())
    with pytest.raises(FailedPrecondition, match="bucket does not exist"):
        store.check()
    with pytest.raises(FailedPrecondition, match="bucket does not exist"):
        store.get_dir("k/1", Path("/nonexistent/out"))


def test_s3_check_names_refused_credentials(s3_endpoint: S3Endpoint) -> None:  # noqa: F811
    client = s3_endpoint.client()
    with Stubber(client) as stub:
        stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
        with pytest.raises(FailedPrecondition, match="credentials refused"):
            S3ArtifactStore("bucket", client=client).check()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_s3_endpoint_down_is_unavailable(
    s3_endpoint: S3Endpoint,  # noqa: F811
    source: Path,
    tmp_path: Path,
) -> None:
    # The stores' own configuration but one attempt: three would only make this slower.
    down = S3Endpoint(url=f"http://127.0.0.1:{closed_port()}", process=s3_endpoint.process)
    client = down.client(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1)
    store = S3ArtifactStore("bucket", client=client)
    for call in (
        lambda: store.exists("k/1"),
        lambda: store.put_dir("k/1", source),
        lambda: store.get_dir("k/1", tmp_path / "out"),
        lambda: store.delete("k/1"),
    ):
        with pytest.raises(Unavailable, match=r"^object storage s3://bucket: .*: "):
            call()
    assert not (tmp_path / "out").exists()
    with pytest.raises(FailedPrecondition, match="unreachable"):
        store.check()


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("SlowDown", 503, Unavailable),
        ("InternalError", 500, Unavailable),
        ("ServiceUnavailable", 503, Unavailable),
        ("AccessDenied", 403, FailedPrecondition),
        ("InvalidAccessKeyId", 403, FailedPrecondition),
    ],
)
def test_s3_errors_say_whether_to_retry(
    s3_endpoint: S3Endpoint,  # noqa: F811
    code: str,
    status: int,
    expected: type[Exception],
) -> None:
    client = s3_endpoint.client()
    store = S3ArtifactStore("bucket", client=client)
    with Stubber(client) as stub:
        stub.add_client_error("head_object", service_error_code=code, http_status_code=status)
        with pytest.raises(expected):
            store.exists("k/1")


def test_s3_upload_error_is_unwrapped(s3_endpoint: S3Endpoint, source: Path) -> None:  # noqa: F811
    """upload_file turns a ClientError into S3UploadFailedError; the 503 still means retry."""
    client = s3_endpoint.client()
    store = S3ArtifactStore(s3_endpoint.make_bucket(), client=client)
    original = client.upload_file

    def failing_upload(*args: Any, **kwargs: Any) -> None:
        with Stubber(client) as stub:
            stub.add_client_error("put_object", service_error_code="SlowDown", http_status_code=503)
            original(*args, **kwargs)

    client.upload_file = failing_upload
    with pytest.raises(Unavailable, match="SlowDown"):
        store.put_dir("k/1", source)
    client.upload_file = original
    assert client.list_objects_v2(Bucket=store.bucket).get("KeyCount", 0) == 0


def test_s3_client_from_the_environment(
    s3_endpoint: S3Endpoint,  # noqa: F811
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = s3_endpoint.make_bucket()
    for name, value in s3_endpoint.env().items():
        monkeypatch.setenv(name, value)
    store = open_artifact_store(f"s3://{bucket}/p", default_root=tmp_path / "unused")
    assert isinstance(store, S3ArtifactStore)
    store.check()
    store.put_dir("adapters/a/1", source)
    store.get_dir("adapters/a/1", tmp_path / "out")
    assert read_tree(tmp_path / "out") == TREE


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("", "default"),
        ("/srv/artifacts", "/srv/artifacts"),
        ("file:///srv/artifacts", "/srv/artifacts"),
        ("file://localhost/srv/my%20artifacts", "/srv/my artifacts"),
    ],
)
def test_urls_of_local_stores(url: str, root: str, tmp_path: Path) -> None:
    store = open_artifact_store(url, default_root=tmp_path / "default")
    assert isinstance(store, LocalArtifactStore)
    assert store.root == (tmp_path / "default" if root == "default" else Path(root))


@pytest.mark.parametrize(
    ("url", "prefix", "shown"),
    [
        ("s3://bucket", "", "s3://bucket"),
        ("s3://my.bucket-1/some/prefix", "some/prefix", "s3://my.bucket-1/some/prefix"),
        ("s3://bucket/some/prefix/", "some/prefix", "s3://bucket/some/prefix"),
    ],
)
def test_urls_of_s3_stores(url: str, prefix: str, shown: str, tmp_path: Path) -> None:
    store = open_artifact_store(url, default_root=tmp_path)
    assert isinstance(store, S3ArtifactStore)
    assert (store.bucket, store.prefix, store.url) == (url.split("/")[2], prefix, shown)


@pytest.mark.parametrize(
    "url",
    [
        "relative/dir",
        "./artifacts",
        "http://example.com/bucket",
        "s3://",
        "s3://Bad_Bucket",
        "s3://bucket/a/../b",
        "s3://bucket?versioning=1",
        "file://otherhost/srv",
        "file:relative",
        "s3://AKIAKEY:secret@bucket",
    ],
)
def test_other_urls_are_refused_saying_what_is_accepted(url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        open_artifact_store(url, default_root=tmp_path)
    assert caught.value.field == "artifact_store"
    assert "file:///absolute/path" in caught.value.message
    assert "secret" not in caught.value.message
