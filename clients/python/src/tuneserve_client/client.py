"""A Python client for tuneserve. Light: grpcio and protobuf only, no torch.

from tuneserve_client import TuneserveClient
with TuneserveClient("localhost:50051") as client:
    job = client.train(rows=[{"prompt": "Q: hi", "response": " hello"}], adapter_id="hi")
    job = client.wait(job.id)
    print(client.generate("Q: hi", adapter_id="hi", greedy=True).text)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tuneserve_client.v1 import tuneserve_pb2 as pb
from tuneserve_client.v1 import tuneserve_pb2_grpc as pb_grpc

FINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


class ClientError(Exception):
    """A failed call, with the server's rich error details unpacked."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        field: str = "",
        row: int | None = None,
        violations: list[tuple[str, str]] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.reason = code, message, reason
        self.field, self.row, self.violations = field, row, violations or []
        self.retry_after_s = retry_after_s  # the server's hint, with RESOURCE_EXHAUSTED

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        call: Any = error
        status = rpc_status.from_call(call)
        reason, field, row, violations, retry = "", "", None, [], None
        for detail in status.details if status else []:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            retry_info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                reason, field = info.reason, info.metadata.get("field", "")
                row = int(info.metadata["row"]) if "row" in info.metadata else None
            elif detail.Unpack(bad):
                violations = [(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(retry_info):
                retry = retry_info.retry_delay.ToNanoseconds() / 1e9
        return cls(
            call.code(),
            call.details() or "",
            reason=reason,
            field=field,
            row=row,
            violations=violations,
            retry_after_s=retry,
        )


class TuneserveClient:
    def __init__(self, target: str, *, timeout: float = 30.0) -> None:
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        self._stub = pb_grpc.TuneserveServiceStub(self._channel)
        self.timeout = timeout

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
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
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
    ) -> pb.Job:
        """Rows are dicts of `text`, or of `prompt` and `response`; paths are on the server."""
        request = pb.TrainJobRequest(
            dataset=_dataset(rows, dataset_path),
            adapter_id=adapter_id,
            lora=lora,
            training=training,
            request_id=request_id,
            parent_adapter_id=parent_adapter_id,
            task=task,
            labels=list(labels),
            chat_template=chat_template,
        )
        if validation_rows is not None or validation_path is not None:
            request.validation.CopyFrom(_dataset(validation_rows, validation_path))
        return self._call(self._stub.TrainJob, request).job

    def get_status(self, job_id: str) -> pb.Job:
        return self._call(self._stub.GetStatus, pb.GetStatusRequest(job_id=job_id)).job

    def loss_curve(self, job_id: str) -> list[pb.LossPoint]:
        request = pb.GetLossCurveRequest(job_id=job_id)
        return list(self._call(self._stub.GetLossCurve, request).points)

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).job

    def list_jobs(
        self, *, state: pb.JobState = pb.JOB_STATE_UNSPECIFIED, page_size: int = 50
    ) -> Iterator[pb.Job]:
        token = ""
        while True:
            page = self._call(
                self._stub.ListJobs,
                pb.ListJobsRequest(page_size=page_size, page_token=token, state=state),
            )
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 0.5,
        timeout: float | None = None,
        on_progress: Callable[[pb.Job], None] | None = None,
    ) -> pb.Job:
        """Poll until the job is SUCCEEDED, FAILED or CANCELLED; return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_status(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.state in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout}s")
            time.sleep(poll_s)

    # --- adapters

    def list_adapters(self) -> list[pb.Adapter]:
        return list(self._call(self._stub.ListAdapters, pb.ListAdaptersRequest()).adapters)

    def get_adapter(self, adapter_id: str) -> pb.Adapter:
        return self._call(
            self._stub.GetAdapter, pb.GetAdapterRequest(adapter_id=adapter_id)
        ).adapter

    def load_adapter(self, adapter_id: str, *, pin: bool = False) -> pb.Adapter:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, pin=pin)
        return self._call(self._stub.LoadAdapter, request, timeout=None).adapter

    def unload_adapter(self, adapter_id: str) -> pb.Adapter:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        return self._call(self._stub.UnloadAdapter, request).adapter

    def import_adapter(self, path: str, adapter_id: str) -> pb.Adapter:
        request = pb.ImportAdapterRequest(path=path, adapter_id=adapter_id)
        return self._call(self._stub.ImportAdapter, request, timeout=None).adapter

    def delete_adapter(self, adapter_id: str) -> None:
        self._call(self._stub.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id=adapter_id))

    # --- generation and classification

    def classify(self, adapter_id: str, texts: Iterable[str]) -> list[pb.Classification]:
        request = pb.ClassifyRequest(adapter_id=adapter_id, texts=list(texts))
        return list(self._call(self._stub.Classify, request, timeout=None).classifications)

    def generate(
        self, prompt: str, *, adapter_id: str = "", **parameters: Any
    ) -> pb.GenerateResponse:
        """Parameters are GenerationParameters fields: max_new_tokens, greedy, temperature,
        top_k, top_p, repetition_penalty, no_repeat_ngram_size, seed, stop."""
        request = pb.GenerateRequest(
            prompt=prompt, adapter_id=adapter_id, parameters=pb.GenerationParameters(**parameters)
        )
        return self._call(self._stub.Generate, request, timeout=None)

    def generate_stream(
        self, prompt: str, *, adapter_id: str = "", timeout: float | None = None, **parameters: Any
    ) -> Iterator[pb.GenerateStreamResponse]:
        request = pb.GenerateStreamRequest(
            prompt=prompt, adapter_id=adapter_id, parameters=pb.GenerationParameters(**parameters)
        )
        try:
            yield from self._stub.GenerateStream(request, timeout=timeout)
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None

    def _call(self, method: Any, request: Any, *, timeout: float | None = -1.0) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout == -1.0 else timeout)
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None


def _dataset(rows: Iterable[Mapping[str, Any]] | None, path: str | None) -> pb.Dataset:
    dataset = pb.Dataset()
    if path is not None:
        dataset.path = path
    else:
        dataset.inline.rows.extend(pb.DatasetRow(**dict(r)) for r in rows or [])
    return dataset
