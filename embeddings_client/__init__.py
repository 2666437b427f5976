"""A Python client for the embeddings gateway: `Client` (blocking) and `AsyncClient` (asyncio).

```python
from embeddings_client import Client

with Client("localhost:50051") as client:
    vectors = client.encode_text(["a cat", "a dog"])
    print(vectors.model.id, vectors.model.version, vectors.vectors.shape)
```
"""

from embeddings_client.async_client import AsyncClient
from embeddings_client.cold_start import FoldedItems
from embeddings_client.connection import Connection
from embeddings_client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    EmbeddingsError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from embeddings_client.messages import Item
from embeddings_client.results import (
    ContentMap,
    Deleted,
    Dropped,
    Embeddings,
    FitProgress,
    FoldIn,
    Hit,
    HitSource,
    Model,
    ModelInfo,
    Recommendations,
    Scores,
    SearchResult,
    Similarity,
    SpaceSearched,
    UpsertAck,
)
from embeddings_client.retry import RetryPolicy
from embeddings_client.sync_client import Client

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "Connection",
    "ContentMap",
    "DeadlineExceeded",
    "Deleted",
    "Dropped",
    "Embeddings",
    "EmbeddingsError",
    "FailedPrecondition",
    "FitProgress",
    "FoldIn",
    "FoldedItems",
    "Hit",
    "HitSource",
    "Internal",
    "InvalidArgument",
    "Item",
    "Model",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "Recommendations",
    "ResourceExhausted",
    "RetryPolicy",
    "Scores",
    "SearchResult",
    "Similarity",
    "SpaceSearched",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UpsertAck",
]
