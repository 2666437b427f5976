"""Channels from the gateway to its backends (encoder workers, index shards, the user-item worker).

Every call on them carries the gateway's credential for its backends (GATEWAY_BACKEND_TOKEN, as a bearer
token; or the client certificate of mutual TLS) and names the gateway's caller it is made for
(callers.py), so that a worker shares itself fairly between the gateway's callers.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.auth import CredentialFileError
from services.common.callers import CALLER, CALLER_METADATA
from services.common.tls import channel_credentials
from services.gateway.settings import GatewaySettings


class _Identity:
    """The backend token and the caller's name, added to the metadata of every call."""

    def __init__(self, token: str) -> None:
        self._fixed = (("authorization", f"Bearer {token}"),) if token else ()

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._fixed)
        if caller := CALLER.get():
            metadata.add(CALLER_METADATA, caller)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One interceptor per kind of call: a channel files an interceptor under the first kind it implements only.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, identity: _Identity) -> None:
        self._identity = identity

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._identity.details(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, identity: _Identity) -> None:
        self._identity = identity

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._identity.details(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, identity: _Identity) -> None:
        self._identity = identity

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._identity.details(details), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, identity: _Identity) -> None:
        self._identity = identity

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(self._identity.details(details), requests)


def _identified(token: str) -> list[grpc.aio.ClientInterceptor]:
    identity = _Identity(token)
    return [_UnaryUnary(identity), _UnaryStream(identity), _StreamUnary(identity), _StreamStream(identity)]


def backend_token(settings: GatewaySettings) -> str:
    """GATEWAY_BACKEND_TOKEN, or the first line of GATEWAY_BACKEND_TOKEN_FILE."""
    return token_setting(settings.backend_token, settings.backend_token_file, "GATEWAY_BACKEND_TOKEN_FILE")


def token_setting(token: str, path: str, setting: str) -> str:
    """`token`, or (when `path` is set) the first line of the file at `path`, read now: a file that cannot be
    read, or holds no token, stops the start naming `setting`."""
    if not path:
        return token.strip()
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CredentialFileError(f"{setting}={path}: cannot read it ({error})") from error
    found = next((line.strip() for line in lines if line.strip()), "")
    if not found:
        raise CredentialFileError(f"{setting}={path} holds no token")
    return found


@dataclass(frozen=True)
class BackendChannels:
    """How every backend channel is opened: message size, reconnect back-off and (optional) TLS."""

    max_message_bytes: int
    reconnect_max_s: float
    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""
    token: str = ""

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "BackendChannels":
        credentials = channel_credentials(
            settings.worker_tls_ca, settings.worker_tls_cert, settings.worker_tls_key, "GATEWAY_WORKER_TLS_"
        )
        return cls(
            settings.max_message_bytes,
            settings.worker_reconnect_max_s,
            credentials,
            settings.worker_tls_server_name,
            backend_token(settings),
        )

    def open(self, address: str) -> grpc.aio.Channel:
        """A channel that reconnects within `reconnect_max_s` after the backend restarts (not after
        gRPC's default of up to 120 s), and spreads calls over every address its name resolves to (the
        replicas behind a Kubernetes headless Service) instead of pinning one."""
        options: list[tuple[str, int | str]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(1000, int(self.reconnect_max_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", int(self.reconnect_max_s * 1000)),
        ]
        interceptors = _identified(self.token)
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(address, self.credentials, options=options, interceptors=interceptors)
