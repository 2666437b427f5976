"""The Milvus boolean expressions of searches and deletes, built so that no caller's text enters them.

A payload filter (`payload_equals`: top-level keys equal to string values) and an id lookup would naturally
be `payload["key"] == "value"` and `id in ["..."]`, with the caller's strings quoted. Quoting is not safe
enough against the engines the gateway talks to: Milvus Lite's C++ parser decodes no escapes but `\\"` and
`\\\\` (`\\n`, `\\u00e9` stay literal), refuses a raw newline, reads `/` in a key as a JSON-pointer step and
refuses an empty key, and pymilvus's own `delete(ids=...)` puts ids between single quotes unescaped (an id
`x' or id != '` deletes everything). So every caller string is replaced by a digest before an expression is
built: each item carries the digests of its id (`id_key`) and of each of its payload's (key, value) string
pairs (`terms`, the very pairs the shards' postings hold: services.common.items.payload_terms), and an
expression is made only of those hex digests and the kinds' numbers. A payload value cannot change an
expression, whatever characters it holds, and matches exactly what it matches on the shards.
"""

import hashlib
import json
from collections.abc import Iterable

from embeddings.v1 import types_pb2 as pb

from services.common.items import payload_terms

TOKEN_CHARS = 32  # hex characters of a digest: 128 bits, no collision in any index's lifetime


def token(*parts: str) -> str:
    """The digest standing for `parts` in the index (a JSON array of them: distinct parts, distinct
    digests; ASCII-escaped, so that any str, lone surrogates included, encodes)."""
    encoded = json.dumps(parts).encode("ascii")
    return hashlib.blake2b(encoded, digest_size=TOKEN_CHARS // 2).hexdigest()


def id_token(item_id: str) -> str:
    return token("id", item_id)


def payload_tokens(payload_json: str) -> list[str]:
    """The digests of a (checked) payload's top-level (key, value) string pairs."""
    return sorted({token("term", key, value) for key, value in payload_terms(payload_json)})


def _listed(tokens: Iterable[str]) -> str:
    return ", ".join(f'"{token_}"' for token_ in tokens)


def ids_expression(tokens: Iterable[str]) -> str:
    """The items whose id has one of these digests."""
    return f"id_key in [{_listed(tokens)}]"


def search_expression(filter_: pb.SearchFilter) -> str:
    """The items a search filter keeps ("" when it keeps every item): one of its kinds (numbers, checked
    by the gateway) and every one of its payload pairs."""
    parts = []
    if filter_.kinds:
        parts.append(f"kind in [{', '.join(str(int(kind)) for kind in sorted(set(filter_.kinds)))}]")
    if filter_.payload_equals:
        terms = sorted({token("term", key, value) for key, value in filter_.payload_equals.items()})
        parts.append(f"array_contains_all(terms, [{_listed(terms)}])")
    return " and ".join(parts)
