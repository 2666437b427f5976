"""The Milvus backend's parts that need no Milvus: the filter expressions (no caller's text in them), the
collection names, the rows, the settings' checks, and how pymilvus's failures become the caller's status."""

import json
import re
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import types_pb2 as pb
from pydantic import ValidationError
from pymilvus.exceptions import MilvusException

from services.common.auth import CredentialFileError
from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.common.vectors import to_wire
from services.gateway.milvus import calls
from services.gateway.milvus.filters import ids_expression, payload_tokens, search_expression, token
from services.gateway.milvus.schema import MAX_TERMS, collection_name, rows
from services.gateway.settings import GatewaySettings
from services.gateway.wiring import Credentials

HOSTILE = [
    '" or 1==1 or "',
    "' or id != '",
    '"] == "x" or payload["name',
    "back\\slash\\",
    "line\nbreak\r",
    "a/b ~0",
    "ünïcödé 😀",
    "",
    "kind in [1] or true",
]
DIGESTS = r'"[0-9a-f]{32}"(, "[0-9a-f]{32}")*'
SEARCH_EXPRESSION = re.compile(
    rf"^(kind in \[\d+(, \d+)*\])?( and )?(array_contains_all\(terms, \[{DIGESTS}\]\))?$"
)


@pytest.mark.parametrize("value", HOSTILE)
def test_no_payload_value_or_key_enters_a_search_expression(value: str) -> None:
    filter_ = pb.SearchFilter(
        kinds=[pb.INPUT_KIND_TEXT, pb.INPUT_KIND_IMAGE], payload_equals={value: value, "k": value}
    )
    expression = search_expression(filter_)
    assert SEARCH_EXPRESSION.fullmatch(expression), expression
    assert expression.startswith("kind in [1, 2] and array_contains_all(terms, [")
    assert re.fullmatch(rf"id_key in \[{DIGESTS}\]", ids_expression([token("id", value), token("id", "x")]))


def test_an_empty_filter_keeps_everything_and_kinds_alone_are_numbers() -> None:
    assert search_expression(pb.SearchFilter()) == ""
    assert search_expression(pb.SearchFilter(kinds=[2, 1, 2])) == "kind in [1, 2]"


def test_digests_tell_apart_what_plain_joining_would_not() -> None:
    assert token("term", "a", "bc") != token("term", "ab", "c")
    assert token("term", "k", "v") != token("term", "v", "k")
    assert token("id", "x") != token("term", "x")
    assert len({token("term", "name", value) for value in HOSTILE}) == len(HOSTILE)


def test_a_rows_terms_are_its_top_level_string_pairs_as_filters_digest_them() -> None:
    payload = json.dumps({"name": "cat", "n": 5, "nested": {"name": "dog"}, "flag": True, "": "empty"})
    assert payload_tokens(payload) == sorted([token("term", "name", "cat"), token("term", "", "empty")])
    wanted = search_expression(pb.SearchFilter(payload_equals={"name": "cat"}))
    assert token("term", "name", "cat") in wanted
    assert payload_tokens("") == []
    # JSON may hold a lone surrogate (no gRPC string can)
    assert payload_tokens('{"k": "\\ud800"}') == [token("term", "k", "\ud800")]


def test_any_space_name_is_a_valid_and_distinct_collection_name() -> None:
    spaces = ["minilm", "clip-ViT-B-32", "a-b", "a_b", "a space/ünï", "1digit", "x" * 128, "\ud800"]
    names = [collection_name("embeddings_", space) for space in spaces]
    for name in names:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and len(name) <= 255, name
    assert len(set(names)) == len(spaces)
    assert names[0].startswith("embeddings_minilm_")


def item(item_id: str, seed: int, payload: str = "") -> idx.IndexItem:
    row = np.random.default_rng(seed).standard_normal(4).astype(np.float32)
    return idx.IndexItem(id=item_id, vector=to_wire(row / np.linalg.norm(row)), payload_json=payload)


def test_rows_keep_the_last_of_duplicate_ids_in_request_order() -> None:
    made = rows([item("a", 1, '{"v": "1"}'), item("b", 2), item("a", 3, '{"v": "3"}')])
    assert [(row["id"], row["payload"]) for row in made] == [("b", ""), ("a", '{"v": "3"}')]
    assert made[1]["id_key"] == token("id", "a") and made[1]["terms"] == [token("term", "v", "3")]


def test_a_payload_with_more_string_pairs_than_milvus_holds_is_refused_by_field() -> None:
    payload = json.dumps({f"k{n}": "" for n in range(MAX_TERMS + 1)})
    with pytest.raises(InvalidArgument) as caught:
        rows([item("ok", 1), item("many", 2, payload)])
    assert caught.value.field == "items[1].payload_json"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "GATEWAY_MILVUS_URI=http://host:port"),
        ({"GATEWAY_MILVUS_URI": "./milvus.db"}, "not './milvus.db'"),
        ({"GATEWAY_MAX_K": "20000"}, "at most 16384"),
        ({"GATEWAY_MILVUS_COLLECTION_PREFIX": "9bad-"}, "GATEWAY_MILVUS_COLLECTION_PREFIX"),
        ({"GATEWAY_MILVUS_INDEX_PARAMS": "[1]"}, "must be a JSON object"),
        ({"GATEWAY_MILVUS_CA_PEM_PATH": "ca.pem"}, "go together"),
        ({"GATEWAY_MILVUS_TOKEN": "a", "GATEWAY_MILVUS_TOKEN_FILE": "f"}, "not both"),
        ({"GATEWAY_MAX_PAYLOAD_BYTES": "70000"}, "65535"),
    ],
)
def test_milvus_settings_refuse_what_cannot_work(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str
) -> None:
    monkeypatch.setenv("GATEWAY_INDEX_BACKEND", "milvus")
    monkeypatch.setenv("GATEWAY_MILVUS_URI", "http://milvus:19530")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if "GATEWAY_MILVUS_URI" not in env and fragment.startswith("GATEWAY_MILVUS_URI"):
        monkeypatch.delenv("GATEWAY_MILVUS_URI")
    with pytest.raises(ValidationError) as caught:
        GatewaySettings()
    assert fragment in str(caught.value)


def test_the_shards_ignore_the_milvus_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_MAX_K", "20000")
    assert GatewaySettings().index_backend == "shards"


class _FailedCall(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def wrapped(cause: BaseException) -> MilvusException:
    """As pymilvus raises a failed call with retries off: a MilvusException keeping the call's `code`
    method, raised `from` itself (which drops the call from the chain)."""
    code = cause.code if isinstance(cause, grpc.RpcError) else 1
    error = MilvusException(code, f"[upsert] Retry run out of 0 retry times, message={cause}")
    error.__cause__ = error
    return error


@pytest.fixture
def milvus_calls() -> calls.MilvusCalls:
    return calls.MilvusCalls(
        GatewaySettings(index_backend="milvus", milvus_uri="http://user:pw@milvus:19530"), ""
    )


def test_a_broken_connection_is_unavailable_naming_milvus_without_credentials(
    milvus_calls: calls.MilvusCalls,
) -> None:
    broken = wrapped(_FailedCall(grpc.StatusCode.UNKNOWN, "Stream removed"))
    error = milvus_calls._failure("upsert", broken, None, 2.0)
    assert isinstance(error, Unavailable)
    assert "Milvus at milvus:19530 is unavailable (" in error.message and "pw" not in error.message
    timed_out = milvus_calls._failure(
        "search", _FailedCall(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline"), None, 2.0
    )
    assert isinstance(timed_out, Unavailable) and "did not complete search within 2.0s" in timed_out.message


def test_milvus_refusals_become_gone_not_ready_rate_limited_or_internal(
    milvus_calls: calls.MilvusCalls,
) -> None:
    def refusal(code: int, message: str) -> Exception:
        error = MilvusException(code, f"[search] Retry run out of 0 retry times, message={message}")
        error.__cause__ = error
        return milvus_calls._failure("search", error, None, 2.0)

    assert isinstance(refusal(100, "collection not found"), calls.Gone)
    assert isinstance(refusal(700, "index not found"), calls.NotReady)
    assert isinstance(refusal(101, "collection not loaded"), calls.NotReady)
    assert isinstance(refusal(8, "rate limit exceeded"), ResourceExhausted)
    internal = refusal(1100, "invalid parameter")
    assert isinstance(internal, calls.Refused) and internal.message.endswith(
        "refused search: invalid parameter"
    )


def test_the_token_file_is_read_at_start_and_a_missing_one_stops_it(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("\n  gateway:s3cret  \n# not read\n")
    settings = GatewaySettings(
        index_backend="milvus", milvus_uri="http://milvus:19530", milvus_token_file=str(token)
    )
    assert Credentials.from_settings(settings).milvus_token == "gateway:s3cret"
    missing = settings.model_copy(update={"milvus_token_file": str(tmp_path / "absent")})
    with pytest.raises(CredentialFileError, match="GATEWAY_MILVUS_TOKEN_FILE="):
        Credentials.from_settings(missing)
    unreadable_pem = settings.model_copy(update={"milvus_server_pem_path": str(tmp_path / "absent.pem")})
    with pytest.raises(CredentialFileError, match="GATEWAY_MILVUS_SERVER_PEM_PATH="):
        Credentials.from_settings(unreadable_pem)


async def test_the_client_gets_the_token_tls_and_database_as_milvus_defines_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[dict[str, object]] = []

    class Client:
        def __init__(self, **kwargs: object) -> None:
            made.append(kwargs)

        def close(self) -> None:
            pass

    monkeypatch.setattr(calls, "MilvusClient", Client)
    settings = GatewaySettings(
        index_backend="milvus",
        milvus_uri="https://milvus.example:19530",
        milvus_db_name="embeddings",
        milvus_ca_pem_path="ca.pem",
        milvus_client_pem_path="client.pem",
        milvus_client_key_path="client.key",
        milvus_server_name="milvus.internal",
    )
    milvus = calls.MilvusCalls(settings, "user:pw")
    await milvus.connect(time.monotonic() + 5)
    milvus.close()
    (kwargs,) = made
    assert kwargs["uri"] == "https://milvus.example:19530" and kwargs["token"] == "user:pw"
    assert kwargs["db_name"] == "embeddings" and kwargs["secure"] is True
    assert (kwargs["ca_pem_path"], kwargs["client_pem_path"], kwargs["client_key_path"]) == (
        "ca.pem",
        "client.pem",
        "client.key",
    )
    assert kwargs["server_name"] == "milvus.internal" and "server_pem_path" not in kwargs
    assert 0 < float(kwargs["timeout"]) <= 5  # type: ignore[arg-type]
