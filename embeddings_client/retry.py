"""Retries with exponential back-off and full jitter, for UNAVAILABLE only, bounded by attempts and by the
call's deadline.

UNAVAILABLE means the call did not reach a service that could act on it (gateway restarting, worker or
shard down, connection refused), so repeating an idempotent call is safe; every other code is an answer
and is raised at once. Each attempt gets what is left of the one deadline, so retries never stretch a
call past the timeout its caller gave.
"""

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from embeddings_client.errors import EmbeddingsError, from_rpc_error

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` tries in all (1: no retries); the n-th wait is uniform in [0, min(max_backoff_s,
    initial_backoff_s * multiplier ** n)] ("full jitter", so clients that failed together do not retry
    together)."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")

    def backoff(self, retry: int) -> float:
        """The wait before retry number `retry` (0 for the first retry)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return ceiling * self.random()

    def next_wait(self, error: EmbeddingsError, attempt: int, remaining_s: float) -> float | None:
        """How long to wait before trying again after attempt number `attempt` (1-based) failed with
        `error`, with `remaining_s` left of the deadline; None: raise `error`."""
        if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_attempts:
            return None
        wait = self.backoff(attempt - 1)
        return wait if wait < remaining_s else None


NO_RETRY = RetryPolicy(max_attempts=1)


def call_with_retry(
    invoke: Callable[[float], T],
    policy: RetryPolicy,
    timeout_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`invoke(seconds left)` until it succeeds or `policy` gives up; gRPC errors come out typed."""
    deadline = clock() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return invoke(max(deadline - clock(), 0.0))
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
        wait = policy.next_wait(error, attempt, deadline - clock())
        if wait is None:
            raise error
        sleep(wait)


async def acall_with_retry(
    invoke: Callable[[float], Awaitable[T]],
    policy: RetryPolicy,
    timeout_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """The asyncio flavour of `call_with_retry`."""
    deadline = clock() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return await invoke(max(deadline - clock(), 0.0))
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
        wait = policy.next_wait(error, attempt, deadline - clock())
        if wait is None:
            raise error
        await sleep(wait)
