"""HybridSearch against the real system (tests/system.py: the text worker's MiniLM, index shards, the
user-item worker, the gateway), through the client and the CLI, on planted data where both parts matter.

Eight products in MiniLM's space, each a colour (red, blue) and a type (running shoes, hat, scarf, gloves),
plus red boots that have content but no interactions (a cold item). A user-item model learns from 200
users, half of whom rate the blue products 5 and the red ones 1, half the other way round. The query is
"red shoes" and the user a blue fan: the query alone puts the red running shoes first, the user alone the
blue products, and the mix the product that is both shoes and blue.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embeddings_client import Client, Item, SearchResult
from tests.system import System

pytestmark = pytest.mark.integration

MODEL = "hybrid-shop"
TAG = {"test": "hybrid"}
QUERY = "red shoes"
FAN = "user-0"  # even users are blue fans
PRODUCTS = {
    f"{colour}-{kind}": f"a {'pair of ' if plural else ''}{colour} {text}"
    for colour in ("red", "blue")
    for kind, text, plural in (
        ("sneakers", "running shoes", True),
        ("hat", "wool hat", False),
        ("scarf", "silk scarf", False),
        ("gloves", "leather gloves", True),
    )
}
COLD = {"red-boots": "a pair of red leather boots"}
BLUE = {item for item in PRODUCTS if item.startswith("blue-")}
SCRIPT = Path(sys.executable).with_name("embeddings")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "embeddings_client.cli"]


def ratings(users: int = 200) -> list[tuple[str, str, float]]:
    """Even users rate every blue product 5 and every red one 1; odd users the other way round."""
    return [
        (f"user-{user}", item, 5.0 if item.startswith("blue-") == (user % 2 == 0) else 1.0)
        for user in range(users)
        for item in PRODUCTS
    ]


@pytest.fixture(scope="module")
def client(system: System) -> Iterator[Client]:
    with Client(system.gateway.address) as connected:
        progress = list(connected.fit(ratings(), model=MODEL, timeout_s=300))
        assert progress[-1].done
        items = [Item(key, text=text, payload=TAG) for key, text in {**PRODUCTS, **COLD}.items()]
        assert connected.upsert(items, space="minilm") == len(items)
        yield connected


def hybrid(client: Client, weight: float, mix: str = "weighted") -> SearchResult:
    return client.hybrid_search(
        QUERY, FAN, k=len(PRODUCTS) + 1, weight=weight, mix=mix, useritem_model=MODEL, where=TAG, timeout_s=60
    )


def ranking(result: SearchResult) -> list[str]:
    return [hit.id for hit in result.hits]


def test_the_query_alone_the_user_alone_and_the_mix_rank_differently_in_the_expected_direction(
    client: Client,
) -> None:
    by_query, by_user, mixed = (hybrid(client, weight) for weight in (0.0, 1.0, 0.5))
    assert by_query.space == "minilm" and by_query.query_model.id == "all-MiniLM-L6-v2"
    # The query alone is the one-space search's order, the red running shoes first.
    search = client.search(QUERY, k=len(PRODUCTS) + 1, space="minilm", where=TAG)
    assert ranking(by_query) == ranking(search) and ranking(by_query)[0] == "red-sneakers"
    # The user alone: the blue fan's four blue products first; the cold item (no user vector) counts 0.
    assert set(ranking(by_user)[:4]) == BLUE
    assert next(hit.score for hit in by_user.hits if hit.id == "red-boots") == 0.0
    # The mix: the product that is both shoes and blue.
    assert ranking(mixed)[0] == "blue-sneakers", [(hit.id, round(hit.score, 3)) for hit in mixed.hits]
    assert ranking(mixed) != ranking(by_query) and ranking(mixed) != ranking(by_user)
    assert ranking(mixed).index("red-sneakers") > 0  # the query's favourite lost ground to the user's taste
    # The sources: the content space's cosine and rank, the user-item model's dot product and rank.
    spaces = [(searched.model.space, searched.hits) for searched in mixed.spaces]
    assert spaces == [("minilm", len(PRODUCTS) + 1), (f"useritem-{MODEL}", len(PRODUCTS))]
    cold = next(hit for hit in mixed.hits if hit.id == "red-boots")
    assert [source.model.space for source in cold.sources] == ["minilm"]


def test_the_user_part_is_the_dot_product_of_the_learnt_vectors(client: Client) -> None:
    result = hybrid(client, 1.0)
    user = client.encode_users([FAN], model=MODEL, normalize=False).vectors[0]
    items = client.encode_items(sorted(PRODUCTS), model=MODEL, normalize=False).vectors
    expected = dict(zip(sorted(PRODUCTS), items @ user, strict=True))
    scores = {
        hit.id: source.score
        for hit in result.hits
        for source in hit.sources
        if source.model.space == f"useritem-{MODEL}"
    }
    assert scores.keys() == expected.keys()
    assert all(np.isclose(scores[item], expected[item], rtol=1e-4, atol=1e-5) for item in expected)


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.75])
def test_the_rrf_mix_is_the_weighted_sum_of_one_over_60_plus_rank(client: Client, weight: float) -> None:
    result = hybrid(client, weight, mix="rrf")
    for hit in result.hits:
        parts = {source.model.space: source.rank for source in hit.sources}
        expected = (1 - weight) / (60 + parts["minilm"]) + weight / (
            60 + parts.get(f"useritem-{MODEL}", np.inf)
        )
        assert hit.score == pytest.approx(expected, rel=1e-5), hit
    assert [hit.score for hit in result.hits] == sorted((hit.score for hit in result.hits), reverse=True)


def test_more_weight_on_the_user_lifts_the_users_favourite_and_drops_the_querys(client: Client) -> None:
    weights = [0.0, 0.25, 0.5, 0.75, 1.0]
    rankings = [ranking(hybrid(client, weight, mix="rrf")) for weight in weights]
    users_favourite, querys_favourite = rankings[-1][0], rankings[0][0]
    lifted = [order.index(users_favourite) for order in rankings]
    dropped = [order.index(querys_favourite) for order in rankings]
    assert lifted == sorted(lifted, reverse=True) and lifted[0] > lifted[-1] == 0, rankings
    assert dropped == sorted(dropped) and dropped[0] == 0 < dropped[-1], rankings


def test_the_cli_hybrid_command(system: System, client: Client) -> None:
    args = ["--json", "hybrid", QUERY, "--user", FAN, "--useritem-model", MODEL, "--mix", "weighted"]
    args += ["--weight", "0.5", "--where", "test=hybrid", "-k", "3"]
    result = subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EMBEDDINGS_ADDRESS": system.gateway.address, "EMBEDDINGS_TOKEN": ""},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["hits"][0]["id"] == "blue-sneakers"
    assert {source["model"]["space"] for source in document["hits"][0]["sources"]} == {
        "minilm",
        f"useritem-{MODEL}",
    }
    unknown = subprocess.run(
        [*COMMAND, "hybrid", QUERY, "--user", "nobody", "--useritem-model", MODEL],
        capture_output=True,
        text=True,
        env={**os.environ, "EMBEDDINGS_ADDRESS": system.gateway.address, "EMBEDDINGS_TOKEN": ""},
        timeout=120,
        check=False,
    )
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr and "'nobody'" in unknown.stderr
