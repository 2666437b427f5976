"""Who a call is from: the key of per-caller limits and fair shares.

At the gateway a caller is its bearer token (when it sends one) or else its IP address. The gateway names
that caller to its workers and shards in the `embeddings-caller` metadata of every call it makes for it
(the `CALLER` context variable carries it from the gateway's call to the calls it makes), so a worker
shares its cores between the gateway's callers rather than seeing one caller, the gateway.
"""

import hashlib
from collections.abc import Iterable
from contextvars import ContextVar

from services.common.auth import bearer_token

CALLER_METADATA = "embeddings-caller"
# The caller of the call being handled (set by the call limits for each call; empty outside a call).
CALLER: ContextVar[str] = ContextVar("caller", default="")


def caller_of(metadata: Iterable[tuple[str, str | bytes]] | None, peer: str, trust_named: bool) -> str:
    """The caller of a call with this metadata from `peer` (gRPC's "ipv4:1.2.3.4:5678" form). `trust_named`:
    take the caller the metadata names (a worker or shard, whose calls come from the gateway)."""
    if trust_named:
        for key, value in metadata or ():
            if key == CALLER_METADATA and isinstance(value, str) and value:
                return value[:64]
    token = bearer_token(metadata)
    if token is not None:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return "ip:" + _host(peer)


def _host(peer: str) -> str:
    """The address of a gRPC peer string without its port ("ipv6:[::1]:5678" -> "[::1]")."""
    _, _, address = peer.partition(":")
    host, separator, port = address.rpartition(":")
    return host if separator and port.isdigit() else address
