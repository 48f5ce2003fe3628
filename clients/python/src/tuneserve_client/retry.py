"""Retries: exponential backoff with full jitter, bounded in attempts and in time.

Only UNAVAILABLE (the server is starting, draining or out of reach) and RESOURCE_EXHAUSTED
(its generation queue is full) are retried: every other code is the server's answer, and
asking again would get the same one. A RetryInfo hint from the server is the shortest wait.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from tuneserve_client.errors import ClientError

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed call is tried again. `RetryPolicy.off()` (or `retry=None` on the
    client) never retries."""

    max_attempts: int = 5
    """Tries in all, the first included; 1 turns retries off."""
    initial_backoff_s: float = 0.2
    """Upper bound of the first wait; the wait is drawn uniformly from [0, bound]."""
    multiplier: float = 2.0
    """Each retry's bound is this times the one before."""
    max_backoff_s: float = 10.0
    """The bound never grows past this (a server's retry hint may still be longer)."""
    max_elapsed_s: float = 60.0
    """No retry is started if its wait would end later than this after the first try. The
    call's deadline, when it has one, bounds the whole call as well."""
    codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES
    """The status codes that are retried."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.max_elapsed_s < 0:
            raise ValueError("backoffs and max_elapsed_s must not be negative")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")

    @classmethod
    def off(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def backoff_s(
        self, retry: int, *, hint_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        """The wait before retry number `retry` (1 for the first): full jitter, uniform in
        [0, min(max_backoff_s, initial_backoff_s * multiplier ** (retry - 1))], and never
        shorter than the server's hint."""
        bound = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return max((rng or random).uniform(0.0, bound), hint_s or 0.0)


def call_with_retries(
    attempt: Callable[[float | None], T],
    *,
    policy: RetryPolicy,
    deadline: float | None,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `attempt(timeout)` until it returns or fails for good; raise ClientError.

    `deadline` (time.monotonic()) bounds the whole call: each attempt gets what is left of
    it as its timeout, and no wait runs past it."""
    started = time.monotonic()
    retry = 0
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return attempt(timeout)
        except grpc.RpcError as e:
            error = ClientError.from_rpc_error(e)
        retry += 1
        if error.code not in policy.codes or retry >= policy.max_attempts:
            raise error
        wait = policy.backoff_s(retry, hint_s=error.retry_after_s)
        now = time.monotonic()
        if now + wait > started + policy.max_elapsed_s or (
            deadline is not None and now + wait >= deadline
        ):
            raise error
        log.debug("%s: %s; retry %d in %.3fs", what, error.code.name, retry, wait)
        sleep(wait)
