"""A fused search's handling of its spaces, with the router, the models and the per-space searches faked:
a space that fails is reported and left out, bad input fails the call, every space failing fails it, no
space holding anything is FAILED_PRECONDITION. (The real thing, over real processes and both index
backends: tests/integration/test_fusion.py.)"""

from dataclasses import dataclass, field

import pytest
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import types_pb2 as pb

from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from services.common.model_card import ModelCard
from services.gateway.fused_search import FusedSearch, SpaceHits
from services.gateway.index_backend import Merged
from services.gateway.settings import GatewaySettings

TEXT = pb.INPUT_KIND_TEXT


def card(space: str) -> ModelCard:
    return ModelCard(id=f"model-{space}", version="v", dimension=4, space=space, input_kinds=(TEXT,))


@dataclass
class FakeRouter:
    spaces: dict[int, set[str]]


@dataclass
class FakeModels:
    def default_card(self, kind: int, space: str = "") -> ModelCard:
        if not space:
            raise InvalidArgument("a model for image inputs is not served here")
        return card(space)


@dataclass
class FakeSearcher:
    """Per space: hits (ids), None (nothing stored) or an error to raise."""

    outcomes: dict[str, list[str] | Exception | None]
    asked: list[str] = field(default_factory=list)

    async def search(
        self, model: ModelCard, query: pb.Input, k: int, filter: pb.SearchFilter, deadline: float
    ) -> SpaceHits:
        self.asked.append(model.space)
        outcome = self.outcomes[model.space]
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is None:
            return SpaceHits(model.ref(), None)
        hits = [pb.Hit(id=item_id, score=1.0 - rank / 10) for rank, item_id in enumerate(outcome)]
        return SpaceHits(model.ref(), Merged(hits, ["shard-1"] if model.space == "b" else []))


def fused(outcomes: dict[str, list[str] | Exception | None]) -> tuple[FusedSearch, FakeSearcher]:
    searcher = FakeSearcher(outcomes)
    router = FakeRouter({TEXT: set(outcomes)})
    return FusedSearch(router, FakeModels(), searcher, GatewaySettings()), searcher  # type: ignore[arg-type]


def request(**fields: object) -> gw.SearchRequest:
    return gw.SearchRequest(input=pb.Input(text="red shoes"), k=5, all_spaces=True, **fields)  # type: ignore[arg-type]


async def test_every_space_searched_and_fused_with_sources() -> None:
    search, searcher = fused({"a": ["x", "y"], "b": ["y", "z"], "c": None})
    response = await search.search(request(), 10)
    assert sorted(searcher.asked) == ["a", "b", "c"]
    assert [hit.id for hit in response.hits] == ["y", "x", "z"]
    assert [source.model.space for source in response.hits[0].sources] == ["b", "a"]
    assert [(s.model.space, s.hits, s.empty) for s in response.spaces] == [
        ("a", 2, False),
        ("b", 2, False),
        ("c", 0, True),
    ]
    assert response.partial and list(response.missing_shards) == ["shard-1"] and not response.missing_spaces
    assert response.space == ""


async def test_a_failing_space_is_named_and_the_others_answer() -> None:
    search, _ = fused(
        {
            "a": ["x"],
            "b": Unavailable("worker w serving 'model-b' is unavailable"),
            "c": DeadlineExceeded("late"),
        }
    )
    response = await search.search(request(), 10)
    assert [hit.id for hit in response.hits] == ["x"]
    assert response.partial and list(response.missing_spaces) == ["b", "c"]
    errors = {searched.model.space: searched.error for searched in response.spaces}
    assert "unavailable" in errors["b"] and errors["c"] == "late" and errors["a"] == ""


async def test_every_space_failing_fails_the_call_with_the_first_error() -> None:
    search, _ = fused({"a": Unavailable("a is down"), "b": Unavailable("b is down")})
    with pytest.raises(Unavailable, match="a is down"):
        await search.search(request(), 10)


async def test_bad_input_in_a_space_fails_the_call() -> None:
    search, _ = fused({"a": ["x"], "b": InvalidArgument("input is too long")})
    with pytest.raises(InvalidArgument, match="too long"):
        await search.search(request(), 10)


async def test_no_space_holding_anything_is_a_failed_precondition_naming_them() -> None:
    search, _ = fused({"a": None, "b": None})
    with pytest.raises(FailedPrecondition, match=r"\(a, b\) holds any item"):
        await search.search(request(), 10)


async def test_empty_spaces_beside_a_missing_one_are_partial_not_refused() -> None:
    search, _ = fused({"a": None, "b": Unavailable("b is down")})
    response = await search.search(request(), 10)
    assert response.partial and list(response.missing_spaces) == ["b"] and not response.hits


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"space": "a"}, "leave `space` and `model` empty"),
        ({"model": "model-a"}, "leave `space` and `model` empty"),
    ],
)
async def test_naming_a_space_or_model_with_all_spaces_is_refused(fields: dict[str, str], words: str) -> None:
    search, _ = fused({"a": ["x"]})
    with pytest.raises(InvalidArgument, match=words):
        await search.search(request(**fields), 10)


async def test_a_vector_query_with_all_spaces_is_refused() -> None:
    search, _ = fused({"a": ["x"]})
    vector = gw.SearchRequest(vector=pb.Vector(data=b"\0" * 16, dim=4), k=3, all_spaces=True)
    with pytest.raises(InvalidArgument, match="needs `input`"):
        await search.search(vector, 10)


async def test_a_kind_with_no_space_is_refused_by_the_router() -> None:
    search, _ = fused({"a": ["x"]})
    image = gw.SearchRequest(input=pb.Input(image=b"\x89PNG"), k=3, all_spaces=True)
    with pytest.raises(InvalidArgument, match="image inputs is not served"):
        await search.search(image, 10)
