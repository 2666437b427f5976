"""Where and how to reach the gateway: address, TLS (root CA, client certificate), bearer token, default
deadlines and the retry policy; builds sync and asyncio channels from one description."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import grpc

from embeddings_client.retry import RetryPolicy

DEFAULT_ADDRESS = "localhost:50051"
MAX_MESSAGE_BYTES = 64 << 20  # the gateway's default GATEWAY_MAX_MESSAGE_BYTES


class ConnectionOptions(TypedDict, total=False):
    """`Connection`'s fields other than the address, as keyword arguments of the clients."""

    token: str | None
    tls: bool
    ca: str | Path | None
    cert: str | Path | None
    key: str | Path | None
    timeout_s: float
    stream_timeout_s: float
    retry: RetryPolicy


@dataclass(frozen=True)
class Connection:
    """How to call one gateway.

    TLS is on when `tls` is set or any of `ca`, `cert`, `key` is given: `ca` is the PEM file of the CA that
    signed the gateway's certificate (default: the system's roots), `cert` and `key` a client certificate
    for a gateway that requires mutual TLS. `token` is sent as `authorization: Bearer <token>` metadata on
    every call. `timeout_s` is the deadline of each unary call (retries included) and `stream_timeout_s`
    that of streaming calls (bulk upsert, Fit), unless a call names its own.
    """

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    timeout_s: float = 30.0
    stream_timeout_s: float = 3600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both `cert` and `key`")

    @property
    def secure(self) -> bool:
        return self.tls or any(path is not None for path in (self.ca, self.cert, self.key))

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials from the PEM files (read now, so a wrong path fails here, naming it)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "ca"),
            private_key=_read(self.key, "key"),
            certificate_chain=_read(self.cert, "cert"),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]

    def channel(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.address, self.credentials(), self.options())
        return grpc.insecure_channel(self.address, self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(self.address, self.credentials(), self.options())
        return grpc.aio.insecure_channel(self.address, self.options())


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the TLS {what} file {path}: {error.strerror}") from error
