"""A Python client for tuneserve. Light: grpcio and protobuf only, no torch.

from tuneserve_client import TuneserveClient
with TuneserveClient("localhost:50051") as client:
    job = client.train(rows=[{"prompt": "Q: hi", "response": " hello"}], adapter_id="hi")
    job = client.wait_for_job(job.id)
    print(client.generate("Q: hi", adapter_id="hi", greedy=True).text)

Every call has a deadline (the constructor's `timeout`, or `generation_timeout` for the calls
that take as long as the model needs; `timeout=` on the call overrides it) and is retried on
UNAVAILABLE and RESOURCE_EXHAUSTED by the client's RetryPolicy. A TrainJob is sent with a
request_id (one is generated if the caller gave none) so that a retried submit is never
queued twice. A stream is retried only until its first message arrives.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import grpc

from tuneserve_client.channel import PemSource, open_channel
from tuneserve_client.errors import ClientError
from tuneserve_client.retry import RetryPolicy, call_with_retries
from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

FINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)

__all__ = ["DEFAULT", "FINAL_STATES", "ClientError", "RetryPolicy", "TuneserveClient"]

T = TypeVar("T")


class _Default(enum.Enum):
    DEFAULT = "default"


DEFAULT = _Default.DEFAULT
"""`timeout=DEFAULT` (the default) takes the client's deadline for that kind of call."""

Timeout = float | None | _Default


class TuneserveClient:
    """A connection to one tuneserve server. Thread-safe: calls may be made from many
    threads at once on one client (they share its channel)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        generation_timeout: float | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 (frozen, so safe to share)
        tls: bool = False,
        root_certificates: PemSource | None = None,
        certificate_chain: PemSource | None = None,
        private_key: PemSource | None = None,
        server_name_override: str | None = None,
        token: str | None = None,
    ) -> None:
        """
        target: "host:port".
        timeout: seconds each quick call (jobs, adapters' metadata) may take, retries
            included; None for no deadline.
        generation_timeout: the same for Generate, GenerateStream, Classify, LoadAdapter and
            ImportAdapter, which take as long as the model needs (default: no deadline).
        retry: when to retry; None or RetryPolicy.off() never retries.
        tls: use TLS with the system's trust store (implied by any certificate below).
        root_certificates: the CA that signed the server's certificate (PEM bytes, or a path).
        certificate_chain, private_key: the client's certificate and key, for mutual TLS.
        server_name_override: the name to check the server's certificate against, when it
            is not the host in `target` (grpc.ssl_target_name_override).
        token: sent as `authorization: Bearer <token>` with every call.
        """
        self._channel, self._metadata = open_channel(
            target,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            server_name_override=server_name_override,
            token=token,
        )
        self._stub = pb_grpc.TuneserveServiceStub(self._channel)
        self.target = target
        self.timeout = timeout
        self.generation_timeout = generation_timeout
        self.retry = retry or RetryPolicy.off()

    def __enter__(self) -> TuneserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the server's health is SERVING (the model is loaded)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                request = health_pb2.HealthCheckRequest()
                status = stub.Check(request, timeout=5, metadata=self._metadata).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout}s")
            time.sleep(0.2)

    # --- jobs

    def train(
        self,
        *,
        rows: Iterable[Mapping[str, Any]] | None = None,
        dataset_path: str | None = None,
        adapter_id: str = "",
        lora: pb.LoraConfig | None = None,
        training: pb.TrainingConfig | None = None,
        request_id: str = "",
        validation_rows: Iterable[Mapping[str, Any]] | None = None,
        validation_path: str | None = None,
        parent_adapter_id: str = "",
        task: pb.TaskType = pb.TASK_TYPE_CAUSAL_LM,
        labels: Iterable[str] = (),
        chat_template: str = "",
        timeout: Timeout = DEFAULT,
    ) -> pb.Job:
        """Rows are dicts of `text`, or of `prompt` and `response`; paths are on the server.
        `request_id` is the idempotency key; without one a fresh key is made, so that a
        retry of this call returns the job the first attempt queued."""
        request = pb.TrainJobRequest(
            dataset=_dataset(rows, dataset_path),
            adapter_id=adapter_id,
            lora=lora,
            training=training,
            request_id=request_id or uuid.uuid4().hex,
            parent_adapter_id=parent_adapter_id,
            task=task,
            labels=list(labels),
            chat_template=chat_template,
        )
        if validation_rows is not None or validation_path is not None:
            request.validation.CopyFrom(_dataset(validation_rows, validation_path))
        return self._call(self._stub.TrainJob, request, timeout).job

    def get_status(self, job_id: str, *, timeout: Timeout = DEFAULT) -> pb.Job:
        return self._call(self._stub.GetStatus, pb.GetStatusRequest(job_id=job_id), timeout).job

    def loss_curve(self, job_id: str, *, timeout: Timeout = DEFAULT) -> list[pb.LossPoint]:
        request = pb.GetLossCurveRequest(job_id=job_id)
        return list(self._call(self._stub.GetLossCurve, request, timeout).points)

    def cancel(self, job_id: str, *, timeout: Timeout = DEFAULT) -> pb.Job:
        return self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout).job

    def list_jobs(
        self,
        *,
        state: pb.JobState = pb.JOB_STATE_UNSPECIFIED,
        page_size: int = 50,
        timeout: Timeout = DEFAULT,
    ) -> Iterator[pb.Job]:
        """Every job, newest first, fetched a page at a time (`timeout` is per page)."""
        token = ""
        while True:
            request = pb.ListJobsRequest(page_size=page_size, page_token=token, state=state)
            page = self._call(self._stub.ListJobs, request, timeout)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def wait_for_job(
        self,
        job_id: str,
        *,
        on_progress: Callable[[pb.Job], None] | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
    ) -> pb.Job:
        """Poll until the job is SUCCEEDED, FAILED or CANCELLED and return it (it does not
        raise for FAILED: look at `job.state` and `job.error`). `on_progress` sees the job
        at every poll (`progress_printer()` prints a line when it moves). TimeoutError after
        `timeout` seconds; None waits as long as it takes."""
        return poll_job(
            self.get_status, job_id, on_progress=on_progress, poll_s=poll_s, timeout=timeout
        )

    wait = wait_for_job

    # --- adapters

    def list_adapters(self, *, timeout: Timeout = DEFAULT) -> list[pb.Adapter]:
        request = pb.ListAdaptersRequest()
        return list(self._call(self._stub.ListAdapters, request, timeout).adapters)

    def get_adapter(self, adapter_id: str, *, timeout: Timeout = DEFAULT) -> pb.Adapter:
        request = pb.GetAdapterRequest(adapter_id=adapter_id)
        return self._call(self._stub.GetAdapter, request, timeout).adapter

    def load_adapter(
        self, adapter_id: str, *, pin: bool = False, timeout: Timeout = DEFAULT
    ) -> pb.Adapter:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, pin=pin)
        return self._call(self._stub.LoadAdapter, request, timeout, slow=True).adapter

    def unload_adapter(self, adapter_id: str, *, timeout: Timeout = DEFAULT) -> pb.Adapter:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        return self._call(self._stub.UnloadAdapter, request, timeout).adapter

    def import_adapter(
        self, path: str, adapter_id: str, *, timeout: Timeout = DEFAULT
    ) -> pb.Adapter:
        request = pb.ImportAdapterRequest(path=path, adapter_id=adapter_id)
        return self._call(self._stub.ImportAdapter, request, timeout, slow=True).adapter

    def delete_adapter(self, adapter_id: str, *, timeout: Timeout = DEFAULT) -> None:
        request = pb.DeleteAdapterRequest(adapter_id=adapter_id)
        self._call(self._stub.DeleteAdapter, request, timeout)

    # --- generation and classification

    def classify(
        self, adapter_id: str, texts: Iterable[str], *, timeout: Timeout = DEFAULT
    ) -> list[pb.Classification]:
        request = pb.ClassifyRequest(adapter_id=adapter_id, texts=list(texts))
        return list(self._call(self._stub.Classify, request, timeout, slow=True).classifications)

    def generate(
        self, prompt: str, *, adapter_id: str = "", timeout: Timeout = DEFAULT, **parameters: Any
    ) -> pb.GenerateResponse:
        """Parameters are GenerationParameters fields: max_new_tokens, greedy, temperature,
        top_k, top_p, repetition_penalty, no_repeat_ngram_size, seed, stop."""
        request = pb.GenerateRequest(
            prompt=prompt, adapter_id=adapter_id, parameters=pb.GenerationParameters(**parameters)
        )
        return self._call(self._stub.Generate, request, timeout, slow=True)

    def generate_stream(
        self, prompt: str, *, adapter_id: str = "", timeout: Timeout = DEFAULT, **parameters: Any
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Generate, streamed. `timeout` bounds the whole stream. The call is retried only
        while no message has arrived (after that a retry would repeat text); closing the
        iterator early cancels the call."""
        request = pb.GenerateStreamRequest(
            prompt=prompt, adapter_id=adapter_id, parameters=pb.GenerationParameters(**parameters)
        )
        deadline = self._deadline(timeout, slow=True)

        def first(attempt_timeout: float | None) -> tuple[Any, pb.GenerateStreamResponse | None]:
            call = self._stub.GenerateStream(
                request, timeout=attempt_timeout, metadata=self._metadata
            )
            return call, next(call, None)

        call, head = call_with_retries(
            first, policy=self.retry, deadline=deadline, what="GenerateStream"
        )
        try:
            if head is None:
                return
            yield head
            yield from call
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op when the stream has ended

    def _deadline(self, timeout: Timeout, *, slow: bool) -> float | None:
        if timeout is DEFAULT:
            timeout = self.generation_timeout if slow else self.timeout
        return None if timeout is None else time.monotonic() + timeout

    def _call(
        self, method: Callable[..., T], request: Any, timeout: Timeout, *, slow: bool = False
    ) -> T:
        return call_with_retries(
            lambda t: method(request, timeout=t, metadata=self._metadata),
            policy=self.retry,
            deadline=self._deadline(timeout, slow=slow),
            what=type(request).__name__.removesuffix("Request"),
        )


def poll_job(
    get_status: Callable[[str], pb.Job],
    job_id: str,
    *,
    on_progress: Callable[[pb.Job], None] | None,
    poll_s: float,
    timeout: float | None,
    sleep: Callable[[float], None] = time.sleep,
) -> pb.Job:
    """`get_status(job_id)` every `poll_s` until the job has ended (TimeoutError after
    `timeout` seconds; None: no limit); `on_progress` sees it at every poll."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = get_status(job_id)
        if on_progress is not None:
            on_progress(job)
        if job.state in FINAL_STATES:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout}s")
        sleep(poll_s)


def _dataset(rows: Iterable[Mapping[str, Any]] | None, path: str | None) -> pb.Dataset:
    dataset = pb.Dataset()
    if path is not None:
        dataset.path = path
    else:
        dataset.inline.rows.extend(pb.DatasetRow(**dict(r)) for r in rows or [])
    return dataset
