"""Run one index shard: python -m services.index (settings: INDEX_* environment variables)."""

import asyncio
import socket
import sys

import grpc
from embeddings.v1 import index_pb2, index_pb2_grpc
from pydantic import ValidationError

from services.common.server import serve
from services.index.service import IndexService
from services.index.settings import ShardSettings
from services.index.store import IndexStore


def main() -> None:
    try:
        settings = ShardSettings()
    except ValidationError as error:  # a settings error is one message, not a traceback
        sys.exit(f"index cannot start: {error}")
    store = IndexStore(settings)
    shard = settings.shard_name or f"{socket.gethostname()}:{settings.port}"
    service = IndexService(store, settings, shard)

    def register(server: grpc.aio.Server) -> list[str]:
        index_pb2_grpc.add_IndexServicer_to_server(service, server)
        return [index_pb2.DESCRIPTOR.services_by_name["Index"].full_name]

    asyncio.run(serve("index", settings, register, store.open, store.close))


if __name__ == "__main__":
    main()
