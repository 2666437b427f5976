"""pymilvus's MilvusClient, which blocks, called off the event loop: on a bounded pool of threads
(GATEWAY_MILVUS_MAX_CALLS), each call within its caller's deadline (a call that waited for a thread past it
is not made), and every failure turned into what the gateway's caller can act on.

pymilvus retries failures itself, up to 75 times with back-off, and past any deadline whose timeout is not
an int: every call here passes `retry_times=0` and a float timeout, so the caller's deadline governs and the
caller's client does the retrying (UNAVAILABLE, as for the shards).

The connection: made at start-up and again whenever Milvus went away (a call failed UNAVAILABLE: the next
call reconnects on a fresh channel rather than wait out gRPC's reconnect back-off, up to two minutes). A
failed connection is not tried again for GATEWAY_WORKER_RECONNECT_MAX_S: meanwhile calls answer UNAVAILABLE
at once, naming Milvus, instead of each holding a thread for its whole deadline.
"""

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
from pymilvus import MilvusClient
from pymilvus.exceptions import ErrorCode, MilvusException

from services.common.errors import Internal, ResourceExhausted, ServiceError, Unavailable
from services.gateway import metrics
from services.gateway.settings import GatewaySettings

log = logging.getLogger("milvus")

T = TypeVar("T")
Job = Callable[[MilvusClient, Callable[[], float]], T]

_CONNECT_FAILED = 2  # pymilvus's Status.CONNECT_FAILED: the channel did not become ready
_NOT_LOADED = 101  # Milvus: collection not loaded
# How long a replaced connection stays open for the calls already on it.
_RETIRE_GRACE_S = 30.0


class Gone(Exception):
    """The collection does not exist (any more): its space was dropped, or never written to."""


class NotReady(Exception):
    """The collection exists but has no index yet, or is not loaded (another gateway is making it)."""


class Refused(Internal):
    """Milvus refused a call the gateway made: a misconfiguration (index parameters) or a bug, INTERNAL for
    the caller, with Milvus's reason."""


class _TimedOut(Exception):
    pass


def address_of(uri: str) -> str:
    """host:port of a Milvus URI, without any credentials in it: how Milvus is named in errors and hits."""
    parts = urlsplit(uri)
    return parts.netloc.rpartition("@")[2] or uri


class MilvusCalls:
    def __init__(self, settings: GatewaySettings, token: str) -> None:
        self.address = address_of(settings.milvus_uri)
        self.name = f"Milvus at {self.address}"
        self._settings = settings
        self._token = token
        self._pool = ThreadPoolExecutor(settings.milvus_max_calls, thread_name_prefix="milvus")
        self._lock = threading.Lock()  # held while connecting: other calls wait for it (within deadlines)
        self._client: MilvusClient | None = None
        self._retry_at = 0.0
        self._last_failure = ""
        self._retiring: dict[threading.Timer, MilvusClient] = {}
        # pymilvus logs every failure at ERROR, retries included; the gateway logs its own line per failure.
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

    async def call(self, what: str, deadline: float, job: Job[T]) -> T:
        """`job(client, remaining)` on a thread (`remaining()`: the seconds left of `deadline`, for each
        pymilvus call's timeout); `what` names the call in errors. Raises Gone, NotReady, or the
        ServiceError the caller gets."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run, what, deadline, job)

    async def connect(self, deadline: float) -> None:
        await self.call("connect", deadline, lambda client, remaining: None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients = [self._client] if self._client is not None else []
            self._client = None
            retiring, self._retiring = self._retiring, {}
        for timer, client in retiring.items():
            timer.cancel()
            clients.append(client)
        for client in clients:
            client.close()

    def _run(self, what: str, deadline: float, job: Job[T]) -> T:
        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimedOut
            return left

        budget = deadline - time.monotonic()
        client: MilvusClient | None = None
        try:
            client = self._connected(deadline)
            return job(client, remaining)
        except (Gone, NotReady, ServiceError):
            raise
        except Exception as error:
            raise self._failure(what, error, client, budget) from None

    def _connected(self, deadline: float) -> MilvusClient:
        """The client, connecting first if there is none (at most once per GATEWAY_WORKER_RECONNECT_MAX_S)."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _TimedOut
        try:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._retry_at:
                raise Unavailable(f"{self.name} is unreachable ({self._last_failure}); retry shortly")
            try:
                self._client = self._connect(deadline - time.monotonic())
            except Exception as error:
                self._retry_at = time.monotonic() + self._settings.worker_reconnect_max_s
                self._last_failure = _reason(error)
                metrics.SHARD_FAILURES.labels(self.name, "connect", "UNAVAILABLE").inc()
                log.warning("cannot connect to %s: %s", self.name, self._last_failure)
                raise Unavailable(
                    f"{self.name} is unreachable ({self._last_failure}); retry shortly"
                ) from None
            log.info("connected to %s", self.name)
            return self._client
        finally:
            self._lock.release()

    def _connect(self, timeout: float) -> MilvusClient:
        if timeout <= 0:
            raise _TimedOut
        settings = self._settings
        tls = {
            "server_pem_path": settings.milvus_server_pem_path,
            "ca_pem_path": settings.milvus_ca_pem_path,
            "client_pem_path": settings.milvus_client_pem_path,
            "client_key_path": settings.milvus_client_key_path,
            "server_name": settings.milvus_server_name,
        }
        secure = settings.milvus_uri.startswith("https://") or any(tls.values())
        return MilvusClient(
            uri=settings.milvus_uri,
            token=self._token,
            db_name=settings.milvus_db_name,
            timeout=timeout,
            alias=f"gateway-{uuid.uuid4().hex}",  # a connection of its own, not pymilvus's shared one
            secure=secure,
            **{key: value for key, value in tls.items() if value},
        )

    def _retire(self, client: MilvusClient) -> None:
        """Stop using `client` (the next call connects afresh); close it once the calls on it are done."""
        close = client.close
        with self._lock:
            if self._client is not client:
                return
            self._client = None
            timer = threading.Timer(_RETIRE_GRACE_S, close)
            timer.daemon = True
            self._retiring = {t: c for t, c in self._retiring.items() if t.is_alive()}
            self._retiring[timer] = client
        timer.start()

    def _failure(self, what: str, error: Exception, client: MilvusClient | None, budget: float) -> Exception:
        code, reason = _code(error), _reason(error)
        if isinstance(error, _TimedOut) or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._counted(
                what,
                "DEADLINE_EXCEEDED",
                Unavailable(
                    f"{self.name} did not complete {what} within {max(0.0, budget):.1f}s; retry shortly (a write "
                    "is safe to retry as it is)"
                ),
            )
        # Milvus answers its own refusals inside a response; a failed gRPC call means it did not answer:
        # gone, restarting, or the connection broke in the middle of the call (UNKNOWN "Stream removed").
        if (isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.RESOURCE_EXHAUSTED) or (
            code == _CONNECT_FAILED or (isinstance(error, ValueError) and "closed channel" in reason)
        ):
            if client is not None:
                self._retire(client)
            return self._counted(
                what,
                "UNAVAILABLE",
                Unavailable(
                    f"{self.name} is unavailable ({reason}); {what} was not completed, retry shortly (a write is "
                    "safe to retry as it is)"
                ),
            )
        if code == ErrorCode.COLLECTION_NOT_FOUND:
            return Gone()
        if code in (ErrorCode.INDEX_NOT_FOUND, _NOT_LOADED):
            return NotReady()
        if code in (ErrorCode.RATE_LIMIT, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return self._counted(
                what,
                "RESOURCE_EXHAUSTED",
                ResourceExhausted(f"{self.name} is rate-limiting {what}; retry later"),
            )
        log.error("%s refused %s: %s", self.name, what, reason)
        return self._counted(what, "INTERNAL", Refused(f"{self.name} refused {what}: {reason}"))

    def _counted(self, what: str, code: str, error: ServiceError) -> ServiceError:
        metrics.SHARD_FAILURES.labels(self.name, what, code).inc()
        log.warning("%s", error.message)
        return error


def _innermost(error: BaseException) -> list[BaseException]:
    """The error and its causes, outermost first (pymilvus wraps errors, and raises some `from` themselves)."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__  # type: ignore[assignment]
    return chain


def _code(error: BaseException) -> Any:
    """The gRPC status code of a failed call, else the innermost Milvus error code (None: neither)."""
    chain = _innermost(error)
    for cause in chain:
        if isinstance(cause, grpc.RpcError) and callable(getattr(cause, "code", None)):
            return cause.code()
        if isinstance(cause, MilvusException) and callable(cause.code):
            # a failed gRPC call: pymilvus keeps its `code` method (not the call) on the exception it raises
            return cause.code()
    for cause in reversed(chain):
        if isinstance(cause, MilvusException) and isinstance(cause.code, int):
            return cause.code
    return None


def _reason(error: BaseException) -> str:
    """What went wrong, in Milvus's words, without pymilvus's retry preamble."""
    chain = _innermost(error)
    for cause in chain:
        if isinstance(cause, grpc.RpcError) and callable(getattr(cause, "details", None)):
            return str(cause.details())
    innermost = chain[-1]
    if isinstance(innermost, MilvusException):
        return innermost.message.rpartition("message=")[2] or innermost.message
    return str(innermost) or type(innermost).__name__
