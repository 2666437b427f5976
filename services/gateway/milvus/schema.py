"""A space's collection in Milvus: its name, its fields, and an item as one of its rows.

Fields: `id` (VARCHAR, the primary key: an upsert replaces by it), `id_key` and `terms` (the digests that
searches and deletes filter on, filters.py), `vector` (FLOAT_VECTOR of the space's dimension, inner product
on unit vectors: cosine), `kind`, `model` and `model_version` (what made the vector) and `payload` (the JSON
text exactly as given, returned with hits).
"""

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from embeddings.v1 import index_pb2 as idx
from pymilvus import CollectionSchema, DataType, FieldSchema, MilvusClient

from services.common.errors import InvalidArgument
from services.common.vectors import from_wire
from services.gateway.milvus.filters import TOKEN_CHARS, id_token, payload_tokens

MAX_TERMS = 4096  # Milvus's largest ARRAY capacity: the string pairs one payload may be filtered on
VECTOR = "vector"
OUTPUT_FIELDS = ["kind", "payload"]


def collection_name(prefix: str, space: str) -> str:
    """The collection of `space`: any space name (up to 128 printable characters) made a valid collection
    name (letters, digits and _), readable, and distinct for distinct spaces (a digest of the exact name)."""
    readable = re.sub(r"[^0-9A-Za-z_]", "_", space)[:64]
    digest = hashlib.blake2b(space.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{prefix}{readable}_{digest}"


def schema(space: str, dimension: int, max_id_bytes: int, max_payload_bytes: int) -> CollectionSchema:
    fields = [
        FieldSchema("id", DataType.VARCHAR, is_primary=True, max_length=max_id_bytes),
        FieldSchema("id_key", DataType.VARCHAR, max_length=TOKEN_CHARS),
        FieldSchema(VECTOR, DataType.FLOAT_VECTOR, dim=dimension),
        FieldSchema("kind", DataType.INT32),
        FieldSchema("model", DataType.VARCHAR, max_length=256),
        FieldSchema("model_version", DataType.VARCHAR, max_length=256),
        FieldSchema("payload", DataType.VARCHAR, max_length=max(1, max_payload_bytes)),
        FieldSchema(
            "terms",
            DataType.ARRAY,
            element_type=DataType.VARCHAR,
            max_capacity=MAX_TERMS,
            max_length=TOKEN_CHARS,
        ),
    ]
    return CollectionSchema(fields, description=f"embeddings space {json.dumps(space)[:200]}")


def dimension_of(description: dict[str, Any]) -> int:
    """The vector dimension of a collection, from MilvusClient.describe_collection."""
    for field in description["fields"]:
        if field["name"] == VECTOR:
            return int(field["params"]["dim"])
    raise ValueError(f"collection {description.get('collection_name')!r} has no field {VECTOR!r}")


def index_params(client: MilvusClient, index_type: str, params: dict[str, Any]) -> Any:
    prepared = client.prepare_index_params()
    prepared.add_index(VECTOR, index_type=index_type, metric_type="IP", params=params)
    return prepared


def rows(items: Sequence[idx.IndexItem]) -> list[dict[str, Any]]:
    """The items (of an upsert request, in its order) as rows, the last of each id only (duplicate ids: the
    last wins; Milvus Lite would keep both)."""
    last = {item.id: number for number, item in enumerate(items)}
    made = []
    for number, item in enumerate(items):
        if last[item.id] != number:
            continue
        terms = payload_tokens(item.payload_json)
        if len(terms) > MAX_TERMS:
            raise InvalidArgument(
                f"has {len(terms)} top-level string values; the Milvus index filters on at most {MAX_TERMS}",
                field=f"items[{number}].payload_json",
            )
        made.append(
            {
                "id": item.id,
                "id_key": id_token(item.id),
                VECTOR: from_wire(item.vector),
                "kind": int(item.kind),
                "model": item.model.id,
                "model_version": item.model.version,
                "payload": item.payload_json,
                "terms": terms,
            }
        )
    return made
