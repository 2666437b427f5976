"""TLS credentials from PEM files named in settings: the server side of every service, and the client
side of calls to other processes. Files are read once, at start-up; a file that
cannot be read stops the start with its path in the message."""

from pathlib import Path

import grpc

from services.common.auth import CredentialFileError
from services.common.settings import ServiceSettings


def read_pem(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CredentialFileError(f"{setting}={path}: cannot read it ({error.strerror})") from error


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS (mutual when a client CA is set) for the service's port; None: plaintext."""
    if not settings.tls_cert:
        return None
    prefix = settings.model_config.get("env_prefix", "")
    chain = read_pem(settings.tls_cert, f"{prefix}TLS_CERT")
    key = read_pem(settings.tls_key, f"{prefix}TLS_KEY")
    client_ca = read_pem(settings.tls_client_ca, f"{prefix}TLS_CLIENT_CA") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(ca: str, cert: str, key: str, prefix: str) -> grpc.ChannelCredentials | None:
    """TLS to a server whose certificate `ca` signed, presenting `cert`/`key` when given (mutual TLS);
    None when no CA is set (plaintext). `prefix` names the settings in errors."""
    if not ca:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, f"{prefix}CA"),
        private_key=read_pem(key, f"{prefix}KEY") if key else None,
        certificate_chain=read_pem(cert, f"{prefix}CERT") if cert else None,
    )
