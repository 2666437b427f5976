"""Gateway settings, from GATEWAY_* environment variables."""

import json
import re
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, check_pair
from services.gateway.discovery import parse_nameserver


def addresses(listed: str) -> list[str]:
    """The addresses of a comma-separated setting (GATEWAY_WORKERS, GATEWAY_INDEX_SHARDS, ...)."""
    return [address.strip() for address in listed.split(",") if address.strip()]


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    public: ClassVar[bool] = True  # the one door callers use: it may serve them without a credential

    host: str = Field("0.0.0.0", description="Address the gRPC server binds to.")
    port: int = Field(50051, description="gRPC port of the public API.")
    metrics_port: int = Field(9150, description="Prometheus /metrics port; 0 disables it.")
    workers: str = Field(
        "localhost:50061,localhost:50062",
        description="Comma-separated encoder worker addresses; the gateway asks each which models it "
        "serves. Empty: no models (vector-only Search/Upsert).",
    )
    useritem: str = Field(
        "localhost:50063",
        description="Address of the user-item worker (Recommend, SimilarItems, FoldIn, Fit; Encode of user "
        "and item ids). Empty: none, and those calls answer UNIMPLEMENTED.",
    )
    fit_timeout_s: float = Field(
        3600.0, description="Deadline of a Fit passed to the user-item worker when the caller set none."
    )
    model_refresh_s: float = Field(5.0, description="How often the workers' model lists are refreshed.")
    worker_timeout_s: float = Field(
        30.0, description="Deadline of a call to a worker when the caller set none (else the caller's)."
    )
    worker_reconnect_max_s: float = Field(
        2.0,
        description="Longest wait between attempts to reconnect to a worker (or Milvus) that went away; "
        "meanwhile calls needing it answer UNAVAILABLE at once.",
    )
    default_text_model: str = Field("all-MiniLM-L6-v2", description="Model for text when none is named.")
    default_image_model: str = Field("efficientnet-lite0", description="Model for images when none is named.")
    default_useritem_model: str = Field(
        "mf", description="Model for user and item ids in Encode when none is named (USERITEM_DEFAULT_MODEL)."
    )
    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Vector cache; rediss:// for TLS; empty: no cache. A password may be in the URL "
        "(redis://:pw@host:6379/0) or in GATEWAY_REDIS_PASSWORD.",
    )
    redis_cluster: bool = Field(
        False,
        description="GATEWAY_REDIS_URL names one node (any) of a Redis Cluster, whose other nodes the "
        "gateway discovers; the URL's database must be 0.",
    )
    redis_password: str = Field("", description="Redis password (AUTH), used when the URL carries none.")
    redis_tls_ca: str = Field("", description="PEM CA that signed Redis's certificate (rediss:// URLs).")
    redis_tls_cert: str = Field("", description="PEM client certificate, when Redis requires one.")
    redis_tls_key: str = Field("", description="PEM key of the Redis client certificate.")
    cache_ttl_s: int = Field(7 * 24 * 3600, description="Lifetime of a cached vector in seconds.")
    redis_timeout_s: float = Field(
        0.25, description="Timeout of one Redis call; past it the cache is bypassed."
    )
    redis_retry_s: float = Field(
        1.0, description="After a Redis failure, how long the cache is bypassed before Redis is tried again."
    )
    max_inputs_per_request: int = Field(
        256,
        description="Most inputs in one Encode (or one Similarity side), items in one Upsert, ids in one "
        "Delete.",
    )
    stream_window: int = Field(8, description="Requests of one EncodeStream or UpsertStream handled at once.")
    index_shards: str = Field(
        "localhost:50071,localhost:50072",
        description="Comma-separated index shard addresses, in a fixed order: an item's shard is chosen "
        "by hashing its id over this list. Empty: no Search/Upsert/Delete.",
    )
    index_shards_srv: str = Field(
        "",
        description="DNS SRV name of the shards' Kubernetes headless Service (e.g. "
        "_grpc._tcp.index.embeddings.svc.cluster.local); set: it replaces GATEWAY_INDEX_SHARDS, and shard "
        "n is the SRV target whose first label ends in -n (StatefulSet pod index-n).",
    )
    index_shard_count: int = Field(
        0,
        ge=0,
        description="With GATEWAY_INDEX_SHARDS_SRV (required then): the number of shards, the StatefulSet's "
        "replicas. Ids are hashed over it, so a pod briefly absent from DNS does not move them.",
    )
    shard_discovery_s: float = Field(
        10.0, gt=0, description="How often GATEWAY_INDEX_SHARDS_SRV is resolved again."
    )
    dns_nameserver: str = Field(
        "",
        description="ip:port of a DNS server to ask for GATEWAY_INDEX_SHARDS_SRV instead of the system's "
        "resolvers (tests, unusual clusters).",
    )
    shard_timeout_s: float = Field(
        5.0,
        description="Deadline of a call to a shard or to Milvus (or the caller's, if sooner); a search lists "
        "shards that miss it as missing and returns the others' hits (Milvus answers whole or not at all: past "
        "it, UNAVAILABLE).",
    )
    max_k: int = Field(1000, description="Largest k of a Search (and of a HybridSearch's candidates).")
    fusion_rrf_k: float = Field(
        60.0,
        gt=0,
        description="K of reciprocal rank fusion (a hit ranked r in a list adds 1 / (K + r)): fused searches "
        "over every space, and HybridSearch's RRF mix. 60 is the value of Cormack et al. (2009).",
    )
    hybrid_candidates: int = Field(
        100,
        gt=0,
        description="HybridSearch: how many of the query's nearest items are ranked by the mix when the "
        "request does not say (at least its k).",
    )
    space_claim_ttl_s: float = Field(
        1.0,
        ge=0,
        description="How long a space's claim (its dimension and generation, from its home shard; with Milvus, "
        "its collection's dimension) is remembered for searches and deletes; writes always ask. After a DropSpace "
        "through another gateway, this one may search the dropped generation (finding nothing) for this long.",
    )
    max_calls_per_client: int = Field(
        200,
        description="Most calls one caller (a bearer token, else an IP address) has in flight at once; past it: "
        "RESOURCE_EXHAUSTED. 0: no limit.",
    )
    backend_token: str = Field(
        "",
        description="Bearer token the gateway sends to its workers and shards (one of their *_AUTH_TOKENS); "
        "empty: none (they then need mutual TLS, or trust the network).",
    )
    backend_token_file: str = Field(
        "", description="File holding GATEWAY_BACKEND_TOKEN (its first line), read at start; instead of it."
    )
    worker_tls_ca: str = Field(
        "",
        description="PEM CA that signed the workers' and shards' certificates; set: the gateway calls them "
        "over TLS (they set *_TLS_CERT/*_TLS_KEY). Empty: plaintext.",
    )
    worker_tls_cert: str = Field(
        "", description="PEM client certificate the gateway presents to workers (mutual TLS)."
    )
    worker_tls_key: str = Field("", description="PEM key of the gateway's client certificate.")
    worker_tls_server_name: str = Field(
        "",
        description="Name the workers' certificates are checked against, when it is not the host in their "
        "addresses (e.g. addresses are IPs).",
    )
    max_payload_bytes: int = Field(16_384, description="Largest JSON payload of one item, in bytes.")
    max_id_bytes: int = Field(512, description="Longest item id, in UTF-8 bytes.")
    index_backend: Literal["shards", "milvus"] = Field(
        "shards",
        description="Where Search/Upsert/Delete/DropSpace go: shards (the built-in index shards, "
        "GATEWAY_INDEX_SHARDS) or milvus (a Milvus server or cluster, GATEWAY_MILVUS_URI; one collection per "
        "space).",
    )
    milvus_uri: str = Field(
        "",
        description="With GATEWAY_INDEX_BACKEND=milvus: the Milvus server, http://host:19530 (https:// for TLS); "
        "a Milvus Lite .db file is not accepted (it would be this gateway's alone).",
    )
    milvus_token: str = Field(
        "",
        description="Milvus credential as Milvus defines it: user:password, or an API key; empty: none (Milvus "
        "without authentication).",
    )
    milvus_token_file: str = Field(
        "", description="File holding GATEWAY_MILVUS_TOKEN (its first line), read at start; instead of it."
    )
    milvus_db_name: str = Field(
        "", description="Milvus database of the collections; empty: Milvus's default."
    )
    milvus_server_pem_path: str = Field(
        "", description="TLS to Milvus: PEM certificate of the server (or of its CA) to trust (one-way TLS)."
    )
    milvus_ca_pem_path: str = Field(
        "", description="Mutual TLS to Milvus: PEM CA of the server's certificate (with the client pair)."
    )
    milvus_client_pem_path: str = Field(
        "", description="Mutual TLS to Milvus: PEM certificate the gateway presents."
    )
    milvus_client_key_path: str = Field("", description="Mutual TLS to Milvus: PEM key of that certificate.")
    milvus_server_name: str = Field(
        "", description="Name Milvus's certificate is checked against, when it is not the URI's host."
    )
    milvus_collection_prefix: str = Field(
        "embeddings_",
        description="Start of the name of every collection the gateway makes (one per space): collections "
        "without it are never touched.",
    )
    milvus_consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = Field(
        "Strong",
        description="Milvus consistency level of searches, deletes and new collections. Strong: a search sees "
        "every write acknowledged before it (as the shards do); Bounded: faster, may miss the last seconds.",
    )
    milvus_index_type: str = Field(
        "AUTOINDEX",
        description="Vector index of new collections (inner product): AUTOINDEX, FLAT, IVF_FLAT, HNSW, ... "
        "(Milvus Lite: FLAT, IVF_FLAT, AUTOINDEX).",
    )
    milvus_index_params: str = Field(
        "{}",
        description='Build parameters of that index, a JSON object, e.g. {"M": 16, "efConstruction": 200}.',
    )
    milvus_search_params: str = Field(
        "{}", description='Search parameters, a JSON object, e.g. {"ef": 128} (HNSW) or {"nprobe": 16} (IVF).'
    )
    milvus_replicas: int = Field(
        1, ge=1, description="In-memory replicas each collection is loaded with (query nodes serving it)."
    )
    milvus_shards: int = Field(
        1, ge=1, description="Shards (DML channels) of new collections: more spread the writes of one space."
    )
    milvus_max_calls: int = Field(
        16,
        ge=1,
        description="Milvus calls in flight at once (pymilvus blocks: each holds a thread); others wait within "
        "their deadline.",
    )

    @model_validator(mode="after")
    def _client_tls_complete(self) -> Self:
        check_pair(
            self.worker_tls_cert, self.worker_tls_key, "GATEWAY_WORKER_TLS_CERT", "GATEWAY_WORKER_TLS_KEY"
        )
        if self.worker_tls_cert and not self.worker_tls_ca:
            raise ValueError("GATEWAY_WORKER_TLS_CERT (mutual TLS to workers) needs GATEWAY_WORKER_TLS_CA")
        check_pair(self.redis_tls_cert, self.redis_tls_key, "GATEWAY_REDIS_TLS_CERT", "GATEWAY_REDIS_TLS_KEY")
        if self.backend_token and self.backend_token_file:
            raise ValueError("set GATEWAY_BACKEND_TOKEN or GATEWAY_BACKEND_TOKEN_FILE, not both")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"GATEWAY_REDIS_URL={self.redis_url!r}: use redis://, rediss:// or unix:// (empty: no cache)"
            )
        redis_tls = self.redis_tls_ca or self.redis_tls_cert
        if redis_tls and not self.redis_url.startswith("rediss://"):
            raise ValueError("GATEWAY_REDIS_TLS_* need a rediss:// GATEWAY_REDIS_URL")
        return self

    @model_validator(mode="after")
    def _shard_discovery(self) -> Self:
        if self.index_shards_srv and self.index_shard_count <= 0:
            raise ValueError(
                "GATEWAY_INDEX_SHARDS_SRV needs GATEWAY_INDEX_SHARD_COUNT > 0 (the StatefulSet's replicas): "
                "ids are hashed over the number of shards, which DNS alone cannot be trusted to give"
            )
        listed = len(addresses(self.index_shards))
        if not self.index_shards_srv and self.index_shard_count not in (0, listed):
            raise ValueError(
                f"GATEWAY_INDEX_SHARD_COUNT={self.index_shard_count} but GATEWAY_INDEX_SHARDS lists {listed} "
                "shards (the count is read with GATEWAY_INDEX_SHARDS_SRV)"
            )
        if self.dns_nameserver:
            parse_nameserver(self.dns_nameserver)  # ValueError naming what is wrong
        if self.hybrid_candidates > self.max_k:
            raise ValueError(
                f"GATEWAY_HYBRID_CANDIDATES={self.hybrid_candidates} is over GATEWAY_MAX_K={self.max_k}, the most "
                "a search may return"
            )
        return self

    @model_validator(mode="after")
    def _milvus(self) -> Self:
        if self.index_backend != "milvus":
            return self
        if not self.milvus_uri.startswith(("http://", "https://")):
            raise ValueError(
                f"GATEWAY_INDEX_BACKEND=milvus needs GATEWAY_MILVUS_URI=http://host:port (or https://), not "
                f"{self.milvus_uri!r}"
            )
        if self.milvus_token and self.milvus_token_file:
            raise ValueError("set GATEWAY_MILVUS_TOKEN or GATEWAY_MILVUS_TOKEN_FILE, not both")
        mutual = (self.milvus_ca_pem_path, self.milvus_client_pem_path, self.milvus_client_key_path)
        if any(mutual) and not all(mutual):
            raise ValueError(
                "GATEWAY_MILVUS_CA_PEM_PATH, GATEWAY_MILVUS_CLIENT_PEM_PATH and GATEWAY_MILVUS_CLIENT_KEY_PATH "
                "(mutual TLS to Milvus) go together"
            )
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", self.milvus_collection_prefix):
            raise ValueError(
                f"GATEWAY_MILVUS_COLLECTION_PREFIX={self.milvus_collection_prefix!r}: a collection name starts "
                "with a letter or _, then letters, digits and _ (at most 64 here)"
            )
        for name in ("milvus_index_params", "milvus_search_params"):
            try:
                parsed = json.loads(getattr(self, name))
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise ValueError(f"GATEWAY_{name.upper()} must be a JSON object, e.g. {{}}")
        # Milvus's own bounds: top-k, and the VARCHAR fields holding ids and payloads.
        if self.max_k > 16_384:
            raise ValueError(f"GATEWAY_MAX_K={self.max_k}: Milvus searches at most 16384 hits")
        for name in ("max_id_bytes", "max_payload_bytes"):
            if getattr(self, name) > 65_535:
                raise ValueError(
                    f"GATEWAY_{name.upper()}={getattr(self, name)}: a Milvus VARCHAR holds 65535 bytes"
                )
        return self
