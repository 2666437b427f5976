"""Settings every service shares. Each service subclasses ServiceSettings with its own env prefix."""

import ipaddress
from typing import ClassVar, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def check_pair(first: str, second: str, first_name: str, second_name: str) -> None:
    """Two settings that only mean something together (a certificate and its key): both set or neither."""
    if bool(first) != bool(second):
        raise ValueError(f"{first_name} and {second_name} go together: set both or neither")


class ServiceSettings(BaseSettings):
    """Network, security, limits, shutdown and logging settings of one gRPC process."""

    model_config = SettingsConfigDict(extra="ignore")

    # Only the gateway is public. Every other process holds data or spends CPU for whoever reaches it, so it
    # does not serve callers without a credential on an address other hosts can reach (see _not_open).
    public: ClassVar[bool] = False

    host: str = Field(
        "127.0.0.1",
        description="Address the gRPC server binds to; another than loopback (e.g. 0.0.0.0) needs a credential "
        "to require, or *_TRUST_NETWORK.",
    )
    port: int = Field(..., description="gRPC port.")
    metrics_port: int = Field(..., description="Prometheus /metrics HTTP port; 0 disables it.")
    log_level: str = Field("INFO", description="Python logging level.")
    shutdown_grace_s: float = Field(
        10.0,
        description="On SIGTERM, how long in-flight calls may run; then they are ended UNAVAILABLE "
        "(shutting down: retry on another instance), which clients retry.",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, description="Largest gRPC message received or sent, in bytes."
    )
    max_concurrent_calls: int = Field(
        1000,
        description="Most calls (streams included) handled at once, health checks not counted; past it: "
        "RESOURCE_EXHAUSTED. 0: no limit.",
    )
    max_calls_per_client: int = Field(
        0,
        description="Most calls one caller has in flight at once (workers and shards: the client the gateway "
        "names for each call); past it: RESOURCE_EXHAUSTED. 0: no limit.",
    )
    stream_idle_timeout_s: float = Field(
        60.0,
        description="A stream on which the caller sends nothing this long while the service waits for it "
        "(and no answer goes out) ends with DEADLINE_EXCEEDED; 0: never.",
    )
    auth_tokens: str = Field(
        "",
        description="Comma-separated bearer tokens, any of which a caller must send as `authorization: Bearer "
        "<token>` (on workers and shards: the gateway's GATEWAY_BACKEND_TOKEN); with the tokens file, either "
        "works. Both empty: no token needed.",
    )
    auth_tokens_file: str = Field(
        "",
        description="File of bearer tokens, one per line (# comments); re-read when it changes, so tokens "
        "rotate without a restart.",
    )
    auth_health: bool = Field(
        False, description="Also require a token for the health and reflection services (open by default)."
    )
    trust_network: bool = Field(
        False,
        description="Serve callers that send no credential on an address other hosts can reach, because the "
        "network already lets only the gateway in (a NetworkPolicy, a private network). The gateway ignores it.",
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

    @property
    def requires_credential(self) -> bool:
        """Callers must present a token or a client certificate."""
        return bool(self.auth_tokens.strip(" ,") or self.auth_tokens_file or self.tls_client_ca)

    @model_validator(mode="after")
    def _not_open(self) -> Self:
        """A worker or shard that anyone could call is refused at start, unless only this host can reach
        it or the operator says the network lets only the gateway in."""
        if self.public or self.requires_credential or self.trust_network or _loopback(self.host):
            return self
        prefix = self.model_config.get("env_prefix", "")
        raise ValueError(
            f"{prefix}HOST={self.host} lets other hosts call this service, and it requires no credential: anyone "
            f"who reaches port {self.port} could use it without the gateway's authentication. Set "
            f"{prefix}AUTH_TOKENS (the gateway sends one as GATEWAY_BACKEND_TOKEN) or mutual TLS "
            f"({prefix}TLS_CLIENT_CA), bind {prefix}HOST=127.0.0.1, or set {prefix}TRUST_NETWORK=true if a "
            "NetworkPolicy or firewall already lets only the gateway in"
        )

    @model_validator(mode="after")
    def _tls_complete(self) -> Self:
        prefix = self.model_config.get("env_prefix", "")
        check_pair(self.tls_cert, self.tls_key, f"{prefix}TLS_CERT", f"{prefix}TLS_KEY")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"{prefix}TLS_CLIENT_CA (mutual TLS) needs {prefix}TLS_CERT and {prefix}TLS_KEY")
        return self


def _loopback(host: str) -> bool:
    """`host` is an address only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
