"""grpc.aio server bootstrap shared by every service.

The server listens at once with health NOT_SERVING, loads its models (or connects its backends) in
`startup`, and only then reports SERVING, so Kubernetes gRPC probes and clients never reach a process
that cannot answer. SIGTERM/SIGINT: health goes NOT_SERVING, new calls are refused, in-flight calls get
`shutdown_grace_s` to finish, then `shutdown` releases the service's resources.
"""

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import BearerAuthInterceptor, CredentialFileError, Tokens
from services.common.interceptor import StatusInterceptor
from services.common.limits import CallLimits
from services.common.metrics import start_metrics_server
from services.common.settings import ServiceSettings
from services.common.tls import server_credentials

log = logging.getLogger("server")

Register = Callable[[grpc.aio.Server], list[str]]


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


# Keepalive: the server pings a connection that has been quiet this long, and drops it when the ping goes
# unanswered (a caller that vanished without closing); connections with no call for 5 minutes are closed
# (callers reconnect when they need to); callers may ping at most every 10 s while they have no call.
_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
]


# gRPC binds with SO_REUSEPORT by default: a second instance started on a port already in use would then
# bind too and take a share of its connections, silently. Without it, that start fails, saying so.
_EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


def _server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    options = [
        _EXCLUSIVE_PORT,
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        *_KEEPALIVE_OPTIONS,
    ]
    if settings.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_s * 1000)),
        ]
    return options


async def _start_health_server(
    health_servicer: health.aio.HealthServicer, settings: ServiceSettings
) -> grpc.aio.Server:
    """A second, plaintext server that answers only grpc.health.v1 from the main server's health state:
    Kubernetes' native gRPC probes and `HEALTHCHECK` cannot present TLS, and health reveals nothing else."""
    server = grpc.aio.server(maximum_concurrent_rpcs=16, options=[_EXCLUSIVE_PORT])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.host}:{settings.health_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as error:
        prefix = settings.model_config.get("env_prefix", "")
        log.error(
            "cannot listen for health checks on %s (%sHEALTH_PORT): in use, or not this host's",
            address,
            prefix,
        )
        raise SystemExit(1) from error
    await server.start()
    return server


async def serve(
    name: str,
    settings: ServiceSettings,
    register: Register,
    startup: Callable[[], Coroutine[Any, Any, None]],
    shutdown: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run one service until SIGTERM/SIGINT. `register` adds the servicers and returns their full names."""
    configure_logging(settings.log_level)
    prefix = settings.model_config.get("env_prefix", "")
    try:
        credentials = server_credentials(settings)
        tokens = Tokens(
            settings.auth_tokens.split(","), settings.auth_tokens_file, setting=f"{prefix}AUTH_TOKENS_FILE"
        )
    except CredentialFileError as error:
        log.error("%s cannot start: %s", name, error)
        raise SystemExit(1) from error
    limits = CallLimits(
        name,
        prefix,
        settings.max_concurrent_calls,
        settings.max_calls_per_client,
        settings.stream_idle_timeout_s,
        trust_named_callers=not settings.public,
    )
    # Outermost first: errors become status codes (and are counted) for whatever the others refuse.
    interceptors: list[grpc.aio.ServerInterceptor] = [StatusInterceptor(name)]
    if tokens.enabled:
        interceptors.append(BearerAuthInterceptor(tokens, settings.auth_health))
    interceptors.append(limits)
    server = grpc.aio.server(interceptors=interceptors, options=_server_options(settings))
    service_names = register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ["", *service_names]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{settings.host}:{settings.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
            transport = "plaintext"
        else:
            port = server.add_secure_port(address, credentials)
            transport = "mutual TLS" if settings.tls_client_ca else "TLS"
    except RuntimeError as error:
        log.error(
            "%s cannot listen on %s (%sPORT): in use by another process, or not this host's",
            name,
            address,
            prefix,
        )
        raise SystemExit(1) from error
    await server.start()
    health_server = await _start_health_server(health_servicer, settings) if settings.health_port else None
    start_metrics_server(settings.metrics_port)
    log.info(
        "%s listening on %s:%d (%s; metrics on %d; plaintext health on %s); loading",
        name,
        settings.host,
        port,
        transport,
        settings.metrics_port,
        settings.health_port or "the main port only",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    ready = loop.create_task(startup())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed = ready.done() and ready.exception() is not None
    if failed:
        log.error("%s failed to start: %r", name, ready.exception())
    elif ready.done():
        for service in ["", *service_names]:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s ready: SERVING", name)
        await stopping
    else:
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)

    log.info("%s stopping: draining in-flight calls (up to %.1fs)", name, settings.shutdown_grace_s)
    await health_servicer.enter_graceful_shutdown()
    # New calls are refused at once; the calls in flight get the grace, then end UNAVAILABLE (CallLimits),
    # before gRPC's own deadline for them (which would cut the connection: UNAVAILABLE or CANCELLED, at random).
    stopping = asyncio.create_task(server.stop(settings.shutdown_grace_s + 5))
    await limits.end_calls(settings.shutdown_grace_s)
    await stopping
    if health_server is not None:
        await health_server.stop(None)
    if shutdown is not None:
        await shutdown()
    log.info("%s stopped", name)
    if failed:
        raise SystemExit(1)
