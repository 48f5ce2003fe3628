"""ClientError: a failed call with the server's rich error details (AIP-193) unpacked."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


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
        try:
            status = rpc_status.from_call(call)
        except ValueError:  # details that disagree with the status: keep code and message
            status = None
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
