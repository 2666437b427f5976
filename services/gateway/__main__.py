"""Run the gateway: python -m services.gateway (settings: GATEWAY_* environment variables)."""

import asyncio

import grpc
from embeddings.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.server import serve
from services.gateway.cache import VectorCache
from services.gateway.encoding import CachingEncoder
from services.gateway.recommending import Recommendations
from services.gateway.routing import Router
from services.gateway.servicer import GatewayService
from services.gateway.settings import GatewaySettings
from services.gateway.sharding import ShardSet


def _addresses(listed: str) -> list[str]:
    return [address.strip() for address in listed.split(",") if address.strip()]


def main() -> None:
    settings = GatewaySettings()

    async def run() -> None:
        router = Router(
            _addresses(settings.workers),
            settings.model_refresh_s,
            settings.max_message_bytes,
            settings.worker_reconnect_max_s,
            _addresses(settings.useritem),
        )
        recommendations = Recommendations(
            settings.useritem, router, settings.max_message_bytes, settings.worker_reconnect_max_s
        )
        cache = VectorCache(
            settings.redis_url, settings.cache_ttl_s, settings.redis_timeout_s, settings.redis_retry_s
        )
        shards = ShardSet(
            _addresses(settings.index_shards), settings.max_message_bytes, settings.worker_reconnect_max_s
        )
        service = GatewayService(router, CachingEncoder(router, cache), shards, recommendations, settings)

        def register(server: grpc.aio.Server) -> list[str]:
            gateway_pb2_grpc.add_GatewayServicer_to_server(service, server)
            return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

        async def startup() -> None:
            await router.start()
            await shards.start(settings.model_refresh_s)

        async def shutdown() -> None:
            await router.close()
            await shards.close()
            await recommendations.close()
            await cache.close()

        await serve("gateway", settings, register, startup, shutdown)

    asyncio.run(run())


if __name__ == "__main__":
    main()
