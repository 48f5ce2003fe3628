"""End to end: property-based fuzzing of every RPC on a real server (issue 18).

Requests are built generically from the proto descriptors, field by field: strings that are
huge, unicode, NUL-laden, path-like or regex-like (and the ids and paths this server really
has), integers at their type's boundaries, floats from 1e-40 to inf and NaN, unknown enum
values, repeated fields, nested messages and oneofs. Then raw bytes: random, and real
requests cut short or corrupted. Whatever arrives, the server answers with a status of its
own choosing (never INTERNAL or UNKNOWN, never a stall past a generous deadline), and
afterwards it is healthy and generates what it generated before.

Bounded for CI: about 4,000 calls, derandomized with no example database, so every run
sends the same requests."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support import ServerThread, adapter_files, make_config, vader_rows
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVICE = pb.DESCRIPTOR.services_by_name["TuneserveService"]
# DeleteAdapter is fuzzed last: it may delete the adapters the other methods' requests name.
DELETE = SERVICE.methods_by_name["DeleteAdapter"]
METHODS = [m for m in SERVICE.methods if m is not DELETE]
# A stall, not a slow answer: the slowest honest call here (a 1 MB prompt tokenized, a
# dataset of a few rows snapshotted) takes about a second.
CALL_TIMEOUT_S = 60.0
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
DETAILS_KEY = "grpc-status-details-bin"
# Per method (14 of them): about 4,000 calls in all, two to three minutes on two cores.
BUILT_EXAMPLES = 80
VARIED_EXAMPLES = 150
RAW_EXAMPLES = 50
# The base of each test's settings: the same requests on every run, no stored examples.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
PROMPT = vader_rows()[6]["prompt"]

# --- values ------------------------------------------------------------------------------

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
INT_EDGES = (
    *(0, 1, -1, 2, 3, 7, 8, 16, 63, 64, 100, 255, 256, 1000, 1024, 4096, 65535, 65536),
    *(2**24 + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1),
    *(-(2**31), -(2**63)),
)
FLOAT_EDGES = (
    *(0.0, -0.0, 1.0, -1.0, 0.5, 1e-7, 1e-40, 1e-45, -1e-40, 3.4e38, 1e39),
    *(float("inf"), float("-inf"), float("nan")),
)
ODD_STRINGS = (
    *("", " ", "\x00", "a\x00b", "\x00" * 64, "\u202eevil", "\ufeffbom", "\t\r\n", "\U0010ffff"),
    *("ünïcödé", "日本語のテキスト", "😀👍🏽", "A", "a" * 63, "a" * 64, "-a", "a.", "_"),
    *("..", "../", "../../../../etc/passwd", "/etc/passwd", "/dev/zero", "/dev/urandom"),
    *("/proc/self/environ", "/", ".", "~", "~/.ssh/id_rsa", "C:\\Windows\\win.ini"),
    *("\\\\server\\share", "file:///etc/passwd", "https://example.com/adapter", "gpt2"),
    *(".*", "(a+)+$", "(.*a){20}", "[", "\\", "*", "?", "%s%n%x", "${jndi:ldap://x/a}"),
    *("{{ 7 * 7 }}", "{% for i in range(3) %}{{ i }}{% endfor %}", "{{", "{%", "{{ x.y.z }}"),
    *("'; DROP TABLE jobs; --", "null", "NaN", "-1", "0", "99999999999999999999", "1e999"),
    *("<|endoftext|>", "</s>", "### Human:", "Question: Who is your father? Answer:"),
    *("default", "all-linear", "c_attn", "c_proj", "lm_head", "wte", "*", "linear", "cosine"),
    *("constant", "completion", "all", "system", "user", "assistant", "tool"),
)
HUGE_STRINGS = (
    "x" * 1_000_000,
    "é" * 250_000,
    "😀" * 100_000,
    "a\x00" * 100_000,
    "\n" * 200_000,
    "{{" * 50_000,
    "../" * 50_000,
    "Question: " * 50_000,
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `choices`, each drawn about `weight` times in sum(weights); shrinks toward
    the first."""
    table = [s for weight, s in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def strings(known: tuple[str, ...]) -> st.SearchStrategy[str]:
    return weighted(
        (3, st.sampled_from(known)),
        (3, st.sampled_from(ODD_STRINGS)),
        (3, st.text(max_size=40)),
        (1, st.text(min_size=200, max_size=3000)),
        (1, st.sampled_from(HUGE_STRINGS)),
    )


def scalars(field: FieldDescriptor, known: tuple[str, ...]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        edges = sorted({low, high, *(e for e in INT_EDGES if low <= e <= high)}, key=abs)
        return weighted((2, st.sampled_from(edges)), (1, st.integers(low, high)))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return weighted((4, st.sampled_from(FLOAT_EDGES)), (1, st.floats(width=width)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        unknown = [max(numbers) + 1, 99, -1, 2**31 - 1, -(2**31)]
        return weighted((3, st.sampled_from(numbers)), (1, st.sampled_from(unknown)))
    if kind == FieldDescriptor.TYPE_STRING:
        return strings(known)
    if kind == FieldDescriptor.TYPE_BYTES:
        return weighted((4, st.binary(max_size=64)), (1, st.just(b"\x00" * 1_000_000)))
    raise AssertionError(f"no strategy for {field.full_name} (type {kind})")


def values(field: FieldDescriptor, known: tuple[str, ...], depth: int) -> st.SearchStrategy[Any]:
    one = (
        messages(field.message_type, known, depth + 1)
        if field.type == FieldDescriptor.TYPE_MESSAGE
        else scalars(field, known)
    )
    if field.is_repeated:
        return weighted((4, st.lists(one, max_size=4)), (1, st.lists(one, max_size=12)))
    return one


@functools.cache
def messages(
    descriptor: Descriptor, known: tuple[str, ...], depth: int = 0
) -> st.SearchStrategy[Any]:
    """Messages of `descriptor`: each field set or left unset, at most one field of each
    oneof (proto3 `optional` fields are one-field oneofs: set or not)."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 4:
        return st.builds(cls)
    in_oneof = {f.name for o in descriptor.oneofs for f in o.fields}
    plain = {f.name: values(f, known, depth) for f in descriptor.fields if f.name not in in_oneof}
    oneofs = [
        st.one_of(
            st.none(), *(st.tuples(st.just(f.name), values(f, known, depth)) for f in o.fields)
        )
        for o in descriptor.oneofs
    ]

    def build(chosen: dict[str, Any], picks: tuple[Any, ...]) -> Any:
        fields = [*chosen.items(), *(p for p in picks if p is not None)]
        return _filled(cls(), descriptor, fields)

    return st.builds(build, st.fixed_dictionaries({}, optional=plain), st.tuples(*oneofs))


def _filled(message: Any, descriptor: Descriptor, fields: list[tuple[str, Any]]) -> Any:
    for name, value in fields:
        field = descriptor.fields_by_name[name]
        target = getattr(message, name) if field.is_repeated else None
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if target is not None:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                getattr(message, name).CopyFrom(value)
        elif target is not None:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


@functools.cache
def sparse(
    descriptor: Descriptor, known: tuple[str, ...], depth: int = 0
) -> st.SearchStrategy[Any]:
    """Messages of `descriptor` with one field set, or two (nested messages sparse too):
    merged into a valid request, they leave most of it valid, so the hostile values reach
    the code behind validation."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 4 or not descriptor.fields:
        return st.builds(cls)

    def value(f: FieldDescriptor) -> st.SearchStrategy[Any]:
        if f.type != FieldDescriptor.TYPE_MESSAGE:
            return values(f, known, depth)
        one = sparse(f.message_type, known, depth + 1)
        return st.lists(one, min_size=1, max_size=3) if f.is_repeated else one

    def build(chosen: list[tuple[str, Any]]) -> Any:
        return _filled(cls(), descriptor, chosen)

    # Each field as likely as the leaves under it: every leaf, at any depth, equally so.
    picks = weighted(
        *((_leaves(f, depth), st.tuples(st.just(f.name), value(f))) for f in descriptor.fields)
    )
    one, two = (st.lists(picks, min_size=n, max_size=n, unique_by=lambda p: p[0]) for n in (1, 2))
    return weighted((3, one), (1, two)).map(build)


def _leaves(field: FieldDescriptor, depth: int) -> int:
    if field.type != FieldDescriptor.TYPE_MESSAGE or depth >= 4:
        return 1
    return max(1, sum(_leaves(f, depth + 1) for f in field.message_type.fields))


def variations(base: Any, known: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """`base` (a valid request) with a sparse message merged in: its scalar fields replace
    the base's, repeated fields are appended to, nested messages merged the same way."""

    def merge(change: Any) -> Any:
        request = type(base)()
        request.CopyFrom(base)
        request.MergeFrom(change)
        return request

    return sparse(base.DESCRIPTOR, known).map(merge)


def corrupted(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Serialized requests cut short, with a byte changed, or with bytes added."""

    def mutate(data: bytes, how: int, at: int, junk: bytes) -> bytes:
        at = at % (len(data) + 1)
        if how == 0:
            return data[:at]
        if how == 1 and data:
            at = min(at, len(data) - 1)
            return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        if how == 2:
            return data[:at] + junk + data[at:]
        return data + junk

    return st.builds(
        mutate,
        valid.map(lambda m: m.SerializeToString()),
        st.integers(0, 3),
        st.integers(0, 2**16),
        st.binary(min_size=1, max_size=16),
    )


# --- the server --------------------------------------------------------------------------


class Records(logging.Handler):
    """The server's log records (it runs in this process), to show beside a failure."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        self.lines.append(text[:500])


class Fuzzed:
    def __init__(self, server: ServerThread, known: tuple[str, ...], records: Records) -> None:
        self.server, self.known, self.records = server, known, records
        self.channel = grpc.insecure_channel(
            server.target,
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self.stub = pb_grpc.TuneserveServiceStub(self.channel)
        self.calls = 0
        self.codes: dict[str, dict[str, int]] = {}  # method -> status -> calls
        self.greedy_before = ""
        self.job_id = ""  # the job that trained fuzz-seed
        self.bases: dict[str, Any] = {}  # method -> a valid request

    def generate_greedy(self) -> str:
        request = pb.GenerateRequest(
            prompt=PROMPT, parameters=pb.GenerationParameters(greedy=True, max_new_tokens=16)
        )
        return str(self.stub.Generate(request, timeout=CALL_TIMEOUT_S).text)

    def call(self, method: MethodDescriptor, request: Any, *, raw: bool = False) -> None:
        """Send `request` (a message, or bytes when `raw`) and check the answer."""
        path = f"/{SERVICE.full_name}/{method.name}"
        if raw:
            make = (
                self.channel.unary_stream if method.server_streaming else self.channel.unary_unary
            )
            callable_: Callable[..., Any] = make(path)
        else:
            callable_ = getattr(self.stub, method.name)
        logged = len(self.records.lines)
        started = time.monotonic()
        code, details, trailers, reply = grpc.StatusCode.OK, "", (), None
        try:
            if method.server_streaming:
                reply = list(callable_(request, timeout=CALL_TIMEOUT_S))
            else:
                reply = callable_(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            code, details, trailers = e.code(), e.details(), e.trailing_metadata() or ()
        self.calls += 1
        seen = self.codes.setdefault(method.name, {})
        seen[code.name] = seen.get(code.name, 0) + 1
        context = (
            f"{method.name}({_short(request)}) -> {code.name} {details!r} after "
            f"{time.monotonic() - started:.1f}s; server log: {self.records.lines[logged:]}"
        )
        assert code not in NEVER, context
        if code != grpc.StatusCode.OK:
            # A status the server chose (AIP-193: with an ErrorInfo), not one the transport
            # made up, such as a client refusing trailers too large to read.
            assert _error_info(trailers) is not None, context
        elif method.name == "TrainJob":  # keep the queue short and the trainer idle
            job = pb.TrainJobResponse.FromString(reply).job if raw else reply.job
            try:
                self.stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                # A repeated request_id answers with the first job, which may have ended.
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, bytes) else str(value)
    return text if len(text) < 600 else f"{text[:600]}... ({len(text)} characters)"


class Shown:
    """A drawn request whose repr (printed with a failing example) is cut to a readable
    length: requests carry strings of a megabyte."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return _short(self.value)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints this
        printer.text(repr(self))


def _error_info(trailers: Any) -> error_details_pb2.ErrorInfo | None:
    for key, value in trailers:
        if key == DETAILS_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


def _wait_done(stub: pb_grpc.TuneserveServiceStub, job_id: str) -> pb.Job:
    deadline = time.monotonic() + 120
    while (job := stub.GetStatus(pb.GetStatusRequest(job_id=job_id)).job).state in (
        pb.JOB_STATE_QUEUED,
        pb.JOB_STATE_RUNNING,
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job


@pytest.fixture(scope="module")
def fuzzed(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """A server with small limits (training and generation stay cheap), a generation and a
    classification adapter, a dataset file under its dataset root and an adapter directory
    under its import root; their names and paths are among the strings requests are built
    from, and the valid requests that variations start from use them."""
    data = tmp_path_factory.mktemp("data")
    roots = tmp_path_factory.mktemp("datasets")
    imports = tmp_path_factory.mktemp("imports")
    records = Records()
    logging.getLogger().addHandler(records)
    server = ServerThread(
        make_config(
            tiny_gpt2,
            data,
            dataset_roots=(roots,),
            adapter_import_roots=(imports,),
            max_dataset_rows=64,
            max_prompt_tokens=256,
            max_new_tokens=16,
            default_max_new_tokens=8,
        )
    )
    fuzz = Fuzzed(server, (), records)
    try:
        _prepare(fuzz, data=data, roots=roots, imports=imports)
        started = time.monotonic()
        yield fuzz
        print(f"\nfuzz: {fuzz.calls} calls in {time.monotonic() - started:.0f}s")
        for name, seen in fuzz.codes.items():
            print(f"  {name}: {seen}")
    finally:
        fuzz.channel.close()
        server.stop()
        logging.getLogger().removeHandler(records)


def _prepare(fuzz: Fuzzed, *, data: Path, roots: Path, imports: Path) -> None:
    """Train the adapters, write the files, and fill in the known strings and the bases."""
    dataset = roots / "rows.jsonl"
    dataset.write_text('{"text": "Question: a? Answer: b"}\n{"text": "Question: c? Answer: d"}\n')
    rows = [pb.DatasetRow(prompt=r["prompt"], response=r["response"]) for r in vader_rows()[:4]]
    train = pb.TrainJobRequest(
        dataset=pb.Dataset(inline=pb.InlineDataset(rows=rows)),
        training=pb.TrainingConfig(max_steps=2, batch_size=2),
    )
    job = fuzz.stub.TrainJob(
        pb.TrainJobRequest(adapter_id="fuzz-seed", **_fields(train)), timeout=CALL_TIMEOUT_S
    ).job
    _wait_done(fuzz.stub, job.id)
    labelled = [
        pb.DatasetRow(text=f"{word} {i}", label=word) for i in range(4) for word in ("good", "bad")
    ]
    classifier = pb.TrainJobRequest(
        dataset=pb.Dataset(inline=pb.InlineDataset(rows=labelled)),
        adapter_id="fuzz-classes",
        task=pb.TASK_TYPE_SEQUENCE_CLASSIFICATION,
        training=pb.TrainingConfig(max_steps=2, batch_size=4),
    )
    _wait_done(fuzz.stub, fuzz.stub.TrainJob(classifier, timeout=CALL_TIMEOUT_S).job.id)
    copy = imports / "fuzz-seed-copy"
    copy.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (copy / f).write_bytes((adapter_files(data, "fuzz-seed") / f).read_bytes())
    fuzz.job_id = job.id
    fuzz.known = (
        *("fuzz-seed", "fuzz-classes", "fuzz-imported", "fuzz-new", job.id, PROMPT),
        *(str(dataset), str(roots), str(copy), str(imports), str(roots / ".." / "data")),
        *(str(data / "jobs.sqlite3"), str(data / "artifacts"), "good", "bad", "0", "50"),
    )
    parameters = pb.GenerationParameters(max_new_tokens=4, seed=1)
    fuzz.bases = {
        "TrainJob": pb.TrainJobRequest(**_fields(train)),  # adapter id: "adapter-<job id>"
        "GetStatus": pb.GetStatusRequest(job_id=job.id),
        "GetLossCurve": pb.GetLossCurveRequest(job_id=job.id),
        "CancelJob": pb.CancelJobRequest(job_id=job.id),
        "ListJobs": pb.ListJobsRequest(page_size=2),
        "ListAdapters": pb.ListAdaptersRequest(),
        "GetAdapter": pb.GetAdapterRequest(adapter_id="fuzz-seed"),
        "DeleteAdapter": pb.DeleteAdapterRequest(adapter_id="fuzz-imported"),
        "LoadAdapter": pb.LoadAdapterRequest(adapter_id="fuzz-seed"),
        "UnloadAdapter": pb.UnloadAdapterRequest(adapter_id="fuzz-seed"),
        "ImportAdapter": pb.ImportAdapterRequest(path=str(copy), adapter_id="fuzz-imported"),
        "Generate": pb.GenerateRequest(
            prompt=PROMPT, adapter_id="fuzz-seed", parameters=parameters
        ),
        "GenerateStream": pb.GenerateStreamRequest(
            prompt=PROMPT, adapter_id="fuzz-seed", parameters=parameters
        ),
        "Classify": pb.ClassifyRequest(adapter_id="fuzz-classes", texts=["good 1", "bad 2"]),
    }
    fuzz.greedy_before = fuzz.generate_greedy()


def _fields(message: Any) -> dict[str, Any]:
    return {f.name: v for f, v in message.ListFields()}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@settings(FUZZ, max_examples=BUILT_EXAMPLES)
@given(data=st.data())
def test_requests_built_from_the_descriptors_get_a_clear_status(
    fuzzed: Fuzzed, method: MethodDescriptor, data: st.DataObject
) -> None:
    request = data.draw(messages(method.input_type, fuzzed.known).map(Shown), label="request")
    fuzzed.call(method, request.value)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@settings(FUZZ, max_examples=VARIED_EXAMPLES)
@given(data=st.data())
def test_valid_requests_with_hostile_fields_get_a_clear_status(
    fuzzed: Fuzzed, method: MethodDescriptor, data: st.DataObject
) -> None:
    """A valid request with a field or two (at any depth) replaced: the hostile value gets
    past the validation of the rest."""
    varied = variations(fuzzed.bases[method.name], fuzzed.known)
    request = data.draw(varied.map(Shown), label="request")
    fuzzed.call(method, request.value)


@pytest.mark.parametrize("method", [*METHODS, DELETE], ids=lambda m: m.name)
@settings(FUZZ, max_examples=RAW_EXAMPLES)
@given(data=st.data())
def test_raw_and_corrupted_bytes_get_a_clear_status(
    fuzzed: Fuzzed, method: MethodDescriptor, data: st.DataObject
) -> None:
    valid = st.one_of(
        st.just(fuzzed.bases[method.name]), variations(fuzzed.bases[method.name], fuzzed.known)
    )
    raw = data.draw(st.one_of(st.binary(max_size=512), corrupted(valid)).map(Shown), label="bytes")
    fuzzed.call(method, raw.value, raw=True)


@settings(FUZZ, max_examples=BUILT_EXAMPLES + VARIED_EXAMPLES)
@given(data=st.data())
def test_deleting_adapters_gets_a_clear_status(fuzzed: Fuzzed, data: st.DataObject) -> None:
    built = messages(DELETE.input_type, fuzzed.known)
    varied = variations(fuzzed.bases[DELETE.name], fuzzed.known)
    request = data.draw(st.one_of(varied, built).map(Shown), label="request")
    fuzzed.call(DELETE, request.value)


def test_undecodable_bytes_are_invalid_argument_naming_the_message(fuzzed: Fuzzed) -> None:
    for method in SERVICE.methods:
        path = f"/{SERVICE.full_name}/{method.name}"
        call = (
            fuzzed.channel.unary_stream(path)
            if method.server_streaming
            else fuzzed.channel.unary_unary(path)
        )
        logged = len(fuzzed.records.lines)
        with pytest.raises(grpc.RpcError) as caught:
            reply = call(b"\xff\xff\xff", timeout=CALL_TIMEOUT_S)
            if method.server_streaming:
                list(reply)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
        name = method.input_type.full_name
        assert error.details() == f"the request is not a valid {name}"
        assert fuzzed.records.lines[logged:] == []  # no traceback, no warning


def test_server_is_healthy_and_generates_as_before_after_the_fuzzing(fuzzed: Fuzzed) -> None:
    """Runs after the fuzz tests above (pytest keeps a module's order)."""
    health = health_pb2_grpc.HealthStub(fuzzed.channel)
    for service in ("", SERVICE.full_name):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert fuzzed.generate_greedy() == fuzzed.greedy_before
    stream = fuzzed.stub.GenerateStream(
        pb.GenerateStreamRequest(
            prompt=PROMPT, parameters=pb.GenerationParameters(greedy=True, max_new_tokens=16)
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert "".join(c.text for c in stream) == fuzzed.greedy_before
    fuzzed.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=CALL_TIMEOUT_S)
    jobs = fuzzed.stub.ListJobs(pb.ListJobsRequest(page_size=1000), timeout=CALL_TIMEOUT_S).jobs
    assert fuzzed.job_id in {j.id for j in jobs}
