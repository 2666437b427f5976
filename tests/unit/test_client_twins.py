"""`Client` and `AsyncClient` are written twice by hand: the same public calls with the same parameters.

Each public method of one has a twin of the same name in the other, with the same parameters (names,
kinds, defaults, annotations). The async twin of a method that returns a value is a coroutine function
returning the same type; that of a method returning an `Iterator[X]` (a streaming call) is a plain method
returning an `AsyncIterator[X]`; `__enter__`/`__exit__` pair with `__aenter__`/`__aexit__`.
"""

import inspect
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from embeddings_client import AsyncClient, Client

# Sync method -> its async twin, where the names differ: the context-manager protocols.
RENAMED = {"__enter__": "__aenter__", "__exit__": "__aexit__"}


def public_methods(cls: type) -> list[str]:
    return sorted(name for name, member in vars(cls).items() if callable(member) and not name.startswith("_"))


def parameters(method: Callable[..., Any]) -> list[tuple[str, object, object, object]]:
    """(name, kind, default, resolved annotation) of each parameter."""
    hints = typing.get_type_hints(method)
    return [
        (name, parameter.kind, parameter.default, hints.get(name, inspect.Parameter.empty))
        for name, parameter in inspect.signature(method).parameters.items()
    ]


def async_return(sync_return: object) -> object:
    """What the async twin of a method returning `sync_return` returns (once awaited, unless a stream)."""
    if typing.get_origin(sync_return) is Iterator:
        (item,) = typing.get_args(sync_return)
        return AsyncIterator[item]  # type: ignore[valid-type]
    return AsyncClient if sync_return is Client else sync_return


def test_the_same_public_methods() -> None:
    assert public_methods(Client) == public_methods(AsyncClient)
    assert public_methods(Client)  # the comparison above is of something


@pytest.mark.parametrize("name", ["__init__", *RENAMED, *public_methods(Client)])
def test_twins_have_the_same_signature(name: str) -> None:
    sync = getattr(Client, name)
    twin = getattr(AsyncClient, RENAMED.get(name, name))
    assert parameters(twin) == parameters(sync)
    sync_return = typing.get_type_hints(sync)["return"]
    assert typing.get_type_hints(twin)["return"] == async_return(sync_return)
    assert not inspect.iscoroutinefunction(sync)
    awaited = name != "__init__" and typing.get_origin(sync_return) is not Iterator
    assert inspect.iscoroutinefunction(twin) == awaited
