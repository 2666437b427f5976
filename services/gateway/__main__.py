"""Run the gateway: python -m services.gateway (settings: GATEWAY_* environment variables)."""

import asyncio

import grpc
from embeddings.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.server import serve
from services.gateway.cache import VectorCache
from services.gateway.encoding import CachingEncoder
from services.gateway.routing import Router
from services.gateway.servicer import GatewayService
from services.gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()

    async def run() -> None:
        router = Router(
            [address.strip() for address in settings.workers.split(",") if address.strip()],
            settings.model_refresh_s,
            settings.max_message_bytes,
            settings.worker_reconnect_max_s,
        )
        cache = VectorCache(
            settings.redis_url, settings.cache_ttl_s, settings.redis_timeout_s, settings.redis_retry_s
        )
        service = GatewayService(router, CachingEncoder(router, cache), settings)

        def register(server: grpc.aio.Server) -> list[str]:
            gateway_pb2_grpc.add_GatewayServicer_to_server(service, server)
            return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

        async def shutdown() -> None:
            await router.close()
            await cache.close()

        await serve("gateway", settings, register, router.start, shutdown)

    asyncio.run(run())


if __name__ == "__main__":
    main()
