"""Container health check: python -m services.healthcheck SERVICE (gateway, text, image, index, useritem).

Reads the same environment as the service itself, asks its grpc.health.v1 on this host, and exits 0 when
it is SERVING, 1 otherwise: not serving, not answering, or not askable (a TLS-only port and no
`*_HEALTH_PORT`; Docker reserves exit code 2), with the reason on stderr. Docker's HEALTHCHECK and compose's start order use it; it needs nothing the image
lacks (no grpc_health_probe binary).
"""

import argparse
import importlib
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.settings import ServiceSettings

SETTINGS = {
    "gateway": "services.gateway.settings:GatewaySettings",
    "text": "services.text.settings:TextSettings",
    "image": "services.image.settings:ImageSettings",
    "index": "services.index.settings:ShardSettings",
    "useritem": "services.useritem.settings:UserItemSettings",
}


def load_settings(service: str) -> ServiceSettings:
    module, name = SETTINGS[service].split(":")
    settings: ServiceSettings = getattr(importlib.import_module(module), name)()
    return settings


def probe_port(settings: ServiceSettings) -> int:
    """The port a plaintext probe can ask: the health port, else the main port unless it speaks TLS."""
    if settings.health_port:
        return settings.health_port
    if settings.tls_cert:
        prefix = settings.model_config.get("env_prefix", "")
        raise ValueError(
            f"the main port speaks TLS only: set {prefix}HEALTH_PORT for a plaintext health port to probe"
        )
    return settings.port


def check(port: int, timeout_s: float) -> str:
    """The serving status of the whole process (service ""), by name; UNREACHABLE when it does not answer."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as error:
            return f"UNREACHABLE ({error.code().name}: {error.details()})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=sorted(SETTINGS))
    parser.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args()
    try:
        port = probe_port(load_settings(args.service))
    except ValueError as error:
        print(f"{args.service}: cannot check health: {error}", file=sys.stderr)
        sys.exit(1)
    status = check(port, args.timeout_s)
    print(f"{args.service} on port {port}: {status}")
    sys.exit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
