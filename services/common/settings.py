"""Settings every service shares. Each service subclasses ServiceSettings with its own env prefix."""

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def check_pair(first: str, second: str, first_name: str, second_name: str) -> None:
    """Two settings that only mean something together (a certificate and its key): both set or neither."""
    if bool(first) != bool(second):
        raise ValueError(f"{first_name} and {second_name} go together: set both or neither")


class ServiceSettings(BaseSettings):
    """Network, shutdown and logging settings of one gRPC process."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("0.0.0.0", description="Address the gRPC server binds to.")
    port: int = Field(..., description="gRPC port.")
    metrics_port: int = Field(..., description="Prometheus /metrics HTTP port; 0 disables it.")
    log_level: str = Field("INFO", description="Python logging level.")
    shutdown_grace_s: float = Field(
        10.0, description="On SIGTERM, how long in-flight calls may run before they are cancelled."
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, description="Largest gRPC message received or sent, in bytes."
    )
    max_concurrent_calls: int = Field(
        1000,
        description="Most calls (streams included) handled at once; past it: RESOURCE_EXHAUSTED. 0: no limit.",
    )
    tls_cert: str = Field(
        "", description="PEM certificate chain of this server; with the key, the port speaks TLS only."
    )
    tls_key: str = Field("", description="PEM private key of the TLS certificate.")
    tls_client_ca: str = Field(
        "",
        description="PEM CA bundle; when set, callers must present a client certificate it signed "
        "(mutual TLS). Needs the certificate and key.",
    )
    max_connection_age_s: float = Field(
        0.0,
        description="Ask clients to reconnect after a connection is this old (in-flight calls finish first), "
        "so they re-resolve DNS and spread over replicas added since; 0: never.",
    )
    health_port: int = Field(
        0,
        description="Plaintext port serving only grpc.health.v1, for probes that cannot speak TLS (Kubernetes "
        "gRPC probes, container health checks); 0: health only on the main port.",
    )

    @model_validator(mode="after")
    def _tls_complete(self) -> Self:
        prefix = self.model_config.get("env_prefix", "")
        check_pair(self.tls_cert, self.tls_key, f"{prefix}TLS_CERT", f"{prefix}TLS_KEY")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"{prefix}TLS_CLIENT_CA (mutual TLS) needs {prefix}TLS_CERT and {prefix}TLS_KEY")
        return self
