"""Channels from the gateway to its backends (encoder workers, index shards, the user-item worker)."""

from dataclasses import dataclass

import grpc

from services.common.tls import channel_credentials
from services.gateway.settings import GatewaySettings


@dataclass(frozen=True)
class BackendChannels:
    """How every backend channel is opened: message size, reconnect back-off and (optional) TLS."""

    max_message_bytes: int
    reconnect_max_s: float
    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""

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
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(address, self.credentials, options=options)
