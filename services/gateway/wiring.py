"""The gateway, wired in one place: every part it is made of, built from its settings.

`Credentials.from_settings` reads what start-up must check before anything else (TLS files, the backend
token);
`Gateway` then builds the backends' channels, the router, the cache, the index (the built-in shards, or
Milvus) and the parts that serve each call, inside the event loop (gRPC's asyncio channels belong to it).
"""

from dataclasses import dataclass

import grpc
from embeddings.v1 import gateway_pb2, gateway_pb2_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.tls import read_pem
from services.gateway.cache import RedisAccess, VectorCache
from services.gateway.channels import BackendChannels, token_setting
from services.gateway.choosing import ModelChooser
from services.gateway.cold_start import ColdStart, ContentEncoder
from services.gateway.discovery import SrvDiscovery
from services.gateway.encoding import CachingEncoder, Encoding
from services.gateway.fused_search import FusedSearch, SpaceSearcher
from services.gateway.hybrid import HybridSearch
from services.gateway.index_backend import IndexBackend
from services.gateway.indexing import Indexer
from services.gateway.milvus.backend import MilvusBackend
from services.gateway.recommending import Recommendations
from services.gateway.routing import Router
from services.gateway.servicer import GatewayService
from services.gateway.settings import GatewaySettings, addresses
from services.gateway.shard_backend import ShardBackend
from services.gateway.sharding import ShardSet
from services.gateway.similarity import Similarities


@dataclass(frozen=True)
class Credentials:
    """How the gateway proves itself to its backends and Redis, and the tokens its callers must send."""

    channels: BackendChannels
    redis: RedisAccess
    milvus_token: str

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "Credentials":
        """Raises CredentialFileError naming the setting whose file cannot be read."""
        pem_files = ["redis_tls_ca", "redis_tls_cert", "redis_tls_key"]
        if settings.index_backend == "milvus":
            pem_files += ["milvus_server_pem_path", "milvus_ca_pem_path", "milvus_client_pem_path"]
            pem_files += ["milvus_client_key_path"]
        for setting in pem_files:
            if path := getattr(settings, setting):
                read_pem(path, f"GATEWAY_{setting.upper()}")  # checked now rather than at the first call
        return cls(
            BackendChannels.from_settings(settings),
            RedisAccess(
                settings.redis_password,
                settings.redis_tls_ca,
                settings.redis_tls_cert,
                settings.redis_tls_key,
            ),
            token_setting(settings.milvus_token, settings.milvus_token_file, "GATEWAY_MILVUS_TOKEN_FILE")
            if settings.index_backend == "milvus"
            else "",
        )


class Gateway:
    def __init__(self, settings: GatewaySettings, credentials: Credentials) -> None:
        self._settings = settings
        channels = credentials.channels
        self.router = Router(
            addresses(settings.workers), settings.model_refresh_s, channels, addresses(settings.useritem)
        )
        self.cache = VectorCache(
            settings.redis_url,
            settings.cache_ttl_s,
            settings.redis_timeout_s,
            settings.redis_retry_s,
            credentials.redis,
            cluster=settings.redis_cluster,
        )
        self.recommendations = Recommendations(settings.useritem, self.router, channels)
        models = ModelChooser(
            self.router,
            {
                pb.INPUT_KIND_TEXT: settings.default_text_model,
                pb.INPUT_KIND_IMAGE: settings.default_image_model,
                pb.INPUT_KIND_USER: settings.default_useritem_model,
                pb.INPUT_KIND_ITEM: settings.default_useritem_model,
            },
        )
        encoder = CachingEncoder(self.router, self.cache)
        self.index = index_backend(settings, credentials)
        searcher = SpaceSearcher(encoder, self.index)
        self.service = GatewayService(
            self.router,
            Encoding(models, encoder, settings.max_inputs_per_request),
            Similarities(models, encoder, settings.max_inputs_per_request),
            Indexer(self.router, models, encoder, self.index, settings),
            FusedSearch(self.router, models, searcher, settings),
            HybridSearch(models, encoder, searcher, settings),
            self.recommendations,
            ColdStart(
                ContentEncoder(models, encoder, settings.max_inputs_per_request),
                self.recommendations,
                self.router,
                settings.max_inputs_per_request,
            ),
            settings,
        )

    def register(self, server: grpc.aio.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self.service, server)
        return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    async def start(self) -> None:
        """Learn the workers' models (waiting for one encoder worker) and what the index holds."""
        await self.router.start()
        await self.index.start()

    async def close(self) -> None:
        await self.router.close()
        await self.index.close()
        await self.recommendations.close()
        await self.cache.close()


def index_backend(settings: GatewaySettings, credentials: Credentials) -> IndexBackend:
    """The index GATEWAY_INDEX_BACKEND names: the built-in shards (at fixed addresses, or from a Kubernetes
    headless Service's SRV records), or Milvus."""
    if settings.index_backend == "milvus":
        return MilvusBackend(settings, credentials.milvus_token)
    if settings.index_shards_srv:
        discovery = SrvDiscovery(
            settings.index_shards_srv, settings.index_shard_count, settings.dns_nameserver
        )
        return ShardBackend(ShardSet([], credentials.channels, discovery), settings)
    return ShardBackend(ShardSet(addresses(settings.index_shards), credentials.channels), settings)
