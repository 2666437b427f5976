"""Bearer-token authentication: of the gateway's callers, and of the gateway by its workers and shards.

Callers send `authorization: Bearer <token>` metadata. Tokens come from *_AUTH_TOKENS and/or a file
(*_AUTH_TOKENS_FILE, one per line) that is re-read when it changes, so a mounted Kubernetes Secret rotates
them without a restart. A token is checked against every configured one by comparing SHA-256 digests with
`hmac.compare_digest`, without stopping at the first match: the time taken says nothing about how much
of a token, or which one, matched.
"""

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from services.common.handlers import is_open_service, rewrapped

log = logging.getLogger("auth")


class CredentialFileError(RuntimeError):
    """A file of credentials named in the settings (tokens, a certificate, a key, a CA) cannot be read or
    holds none: the process does not start."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _read_tokens(path: Path, setting: str) -> tuple[list[str], tuple[int, int]]:
    """The file's tokens, and its (modification time, size) stamp as read."""
    try:
        stat = path.stat()
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CredentialFileError(f"{setting}={path}: cannot read it ({error})") from error
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return tokens, (stat.st_mtime_ns, stat.st_size)


class Tokens:
    """The accepted tokens: fixed ones from settings plus those in a file, re-read when it changes."""

    def __init__(
        self,
        listed: Iterable[str],
        file: str = "",
        recheck_s: float = 1.0,
        setting: str = "GATEWAY_AUTH_TOKENS_FILE",
    ) -> None:
        """`setting`: the name of the file's setting, for messages."""
        self._fixed = [_digest(token.strip()) for token in listed if token.strip()]
        self._file = Path(file) if file else None
        self._setting = setting
        self._recheck_s = recheck_s
        self._from_file: list[bytes] = []
        self._file_stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        if self._file is not None:
            self._load()
            if not self._from_file:
                raise CredentialFileError(f"{setting}={self._file} holds no token")

    @property
    def enabled(self) -> bool:
        return bool(self._fixed) or self._file is not None

    def _load(self) -> None:
        assert self._file is not None
        tokens, self._file_stamp = _read_tokens(self._file, self._setting)
        self._from_file = [_digest(token) for token in tokens]

    def _refresh(self) -> None:
        """Re-read the file when its modification time or size changed (at most every `recheck_s`). A file
        that vanished or became unreadable keeps the tokens last read, with a warning."""
        now = time.monotonic()
        if self._file is None or now - self._checked_at < self._recheck_s:
            return
        self._checked_at = now
        try:
            stat = self._file.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._file_stamp:
                self._load()
                log.info("re-read %d tokens from %s", len(self._from_file), self._file)
        except (OSError, CredentialFileError) as error:
            log.warning("keeping the tokens last read: %s", error)

    def accepts(self, token: str) -> bool:
        self._refresh()
        offered = _digest(token)
        matched = False
        for known in (*self._fixed, *self._from_file):
            matched |= hmac.compare_digest(offered, known)
        return matched


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata; None when there is none."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted token with UNAUTHENTICATED; health and reflection stay open
    unless `protect_health`."""

    def __init__(self, tokens: Tokens, protect_health: bool = False) -> None:
        self._tokens = tokens
        self._protect_health = protect_health

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (not self._protect_health and is_open_service(method)):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _refusal(
                handler, "this service needs a bearer token: send `authorization: Bearer <token>`"
            )
        if not self._tokens.accepts(token):
            return _refusal(handler, "the bearer token was not accepted: check the token you send")
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without running it."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    return rewrapped(handler, lambda _, __: refuse, lambda _, __: refuse_streaming)
