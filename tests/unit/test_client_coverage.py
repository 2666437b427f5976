"""Every public call of the gateway is in the SDK and in the CLI.

Each RPC of the `Gateway` service (read from its descriptor, so a call added to gateway.proto is seen
here) and the health check is made by at least one method of `Client` (recorded by running the method,
not read from a table; `test_client_twins` keeps `AsyncClient` in step), and has a command of
`embeddings`. A new RPC fails this test until both have it.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from embeddings.v1 import gateway_pb2

from embeddings_client import Client, Item
from embeddings_client import calls as plans
from embeddings_client.cli import parser

# How each public method of Client is called here (the fewest arguments it takes).
INVOCATIONS: dict[str, Callable[[Client], Any]] = {
    "encode_text": lambda c: c.encode_text("a cat"),
    "encode_image": lambda c: c.encode_image(b"\x89PNG"),
    "encode_users": lambda c: c.encode_users(["u1"]),
    "encode_items": lambda c: c.encode_items(["i1"]),
    "encode_stream": lambda c: c.encode_stream([["a cat"]]),
    "similarity": lambda c: c.similarity(["a cat"], ["a dog"]),
    "search": lambda c: c.search("a kitten"),
    "hybrid_search": lambda c: c.hybrid_search("red shoes", "u1"),
    "upsert": lambda c: c.upsert([Item("a", text="a cat")]),
    "upsert_stream": lambda c: c.upsert_stream([[Item("a", vector=np.ones(2))]], space="s"),
    "delete": lambda c: c.delete(["a"], space="s"),
    "drop_space": lambda c: c.drop_space("s"),
    "recommend": lambda c: c.recommend("u1"),
    "score": lambda c: c.score("u1", ["i1"]),
    "similar_items": lambda c: c.similar_items("i1"),
    "fold_in": lambda c: c.fold_in({"i1": 5.0}),
    "fold_in_items": lambda c: c.fold_in_items({"i9": "a new film"}),
    "fit": lambda c: c.fit([("u1", "i1", 5.0)]),
    "list_models": lambda c: c.list_models(),
    "health": lambda c: c.health(),
}
# The CLI command(s) that make each RPC.
COMMANDS = {
    "Encode": ["encode"],
    "EncodeStream": ["encode-bulk"],
    "Similarity": ["similarity"],
    "ListModels": ["models"],
    "Search": ["search"],
    "HybridSearch": ["hybrid"],
    "Upsert": ["index"],  # the CLI's bulk indexing makes its upserts through UpsertStream
    "UpsertStream": ["index"],
    "Delete": ["delete"],
    "DropSpace": ["drop-space"],
    "Recommend": ["recommend"],
    "Score": ["score"],
    "SimilarItems": ["similar-items"],
    "FoldIn": ["fold-in"],
    "FoldInItems": ["fold-in-items"],
    "Fit": ["fit"],
    "grpc.health.v1.Health/Check": ["health"],
}


def gateway_calls() -> set[str]:
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    return {method.name for method in service.methods}


def rpc_name(path: str) -> str:
    """ "/embeddings.v1.Gateway/Encode" -> "Encode"; other services keep their full name."""
    return path.removeprefix(plans.GATEWAY) if path.startswith(plans.GATEWAY) else path.lstrip("/")


class Recorded(Exception):
    pass


def made_by(method: str) -> set[str]:
    """The RPCs a Client method makes: its plans are recorded instead of sent."""
    made: set[str] = set()
    client = Client.__new__(Client)  # no channel: nothing is sent

    def record(call: Any, timeout_s: float | None) -> Any:
        made.add(rpc_name(call.method))
        if isinstance(call, plans.Streaming):
            list(call.requests)  # the requests build (and so the method's arguments are checked)
        raise Recorded

    client._unary = record  # type: ignore[method-assign]
    client._stream = record  # type: ignore[method-assign]
    with pytest.raises(Recorded):
        INVOCATIONS[method](client)
    return made


def public_methods() -> set[str]:
    return {name for name, member in vars(Client).items() if callable(member) and not name.startswith("_")}


def test_every_public_method_of_the_client_is_exercised_here() -> None:
    assert public_methods() - {"close"} == set(INVOCATIONS)


def test_every_gateway_call_is_made_by_the_client() -> None:
    made = {rpc for method in INVOCATIONS for rpc in made_by(method)}
    expected = gateway_calls() | {"grpc.health.v1.Health/Check"}
    assert expected - made == set(), f"calls the client cannot make: {sorted(expected - made)}"
    assert made <= expected, f"the client calls what the gateway does not serve: {sorted(made - expected)}"


def test_every_gateway_call_has_a_command() -> None:
    assert set(COMMANDS) == gateway_calls() | {"grpc.health.v1.Health/Check"}, (
        f"calls without a command in this table: {sorted(gateway_calls() - set(COMMANDS))}"
    )
    subcommands = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    missing = {command for names in COMMANDS.values() for command in names} - set(subcommands)
    assert not missing, f"commands the CLI lacks: {sorted(missing)}"
