"""Run the gateway: python -m services.gateway (settings: GATEWAY_* environment variables)."""

import asyncio
import sys

import grpc
from embeddings.v1 import gateway_pb2, gateway_pb2_grpc
from pydantic import ValidationError

from services.common.server import serve
from services.common.tls import TlsFileError, read_pem
from services.gateway.auth import BearerAuthInterceptor, TokenFileError, Tokens
from services.gateway.cache import RedisAccess, VectorCache
from services.gateway.channels import BackendChannels
from services.gateway.discovery import SrvDiscovery
from services.gateway.encoding import CachingEncoder
from services.gateway.recommending import Recommendations
from services.gateway.routing import Router
from services.gateway.servicer import GatewayService
from services.gateway.settings import GatewaySettings, addresses
from services.gateway.sharding import ShardSet


def _redis_access(settings: GatewaySettings) -> RedisAccess:
    """Redis credentials, with the TLS files checked now rather than at the first cache call."""
    for setting in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key"):
        if path := getattr(settings, setting):
            read_pem(path, f"GATEWAY_{setting.upper()}")
    return RedisAccess(
        settings.redis_password, settings.redis_tls_ca, settings.redis_tls_cert, settings.redis_tls_key
    )


def main() -> None:
    try:
        settings = GatewaySettings()
    except ValidationError as error:
        sys.exit(f"gateway cannot start: {error}")
    try:
        channels = BackendChannels.from_settings(settings)
        access = _redis_access(settings)
        tokens = Tokens(settings.auth_tokens.split(","), settings.auth_tokens_file)
    except (TlsFileError, TokenFileError) as error:
        sys.exit(f"gateway cannot start: {error}")
    interceptors = [BearerAuthInterceptor(tokens, settings.auth_health)] if tokens.enabled else []

    async def run() -> None:
        router = Router(
            addresses(settings.workers), settings.model_refresh_s, channels, addresses(settings.useritem)
        )
        recommendations = Recommendations(settings.useritem, router, channels)
        cache = VectorCache(
            settings.redis_url,
            settings.cache_ttl_s,
            settings.redis_timeout_s,
            settings.redis_retry_s,
            access,
            cluster=settings.redis_cluster,
        )
        if settings.index_shards_srv:  # shard addresses from a Kubernetes headless Service's SRV records
            discovery = SrvDiscovery(
                settings.index_shards_srv, settings.index_shard_count, settings.dns_nameserver
            )
            shards = ShardSet([], channels, discovery)
        else:
            shards = ShardSet(addresses(settings.index_shards), channels)
        service = GatewayService(router, CachingEncoder(router, cache), shards, recommendations, settings)

        def register(server: grpc.aio.Server) -> list[str]:
            gateway_pb2_grpc.add_GatewayServicer_to_server(service, server)
            return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

        async def startup() -> None:
            await router.start()
            await shards.start(settings.model_refresh_s, settings.shard_discovery_s)

        async def shutdown() -> None:
            await router.close()
            await shards.close()
            await recommendations.close()
            await cache.close()

        await serve("gateway", settings, register, startup, shutdown, interceptors)

    asyncio.run(run())


if __name__ == "__main__":
    main()
