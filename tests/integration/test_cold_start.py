"""Cold-start items through the gateway, with real processes (the session's system: text and image workers,
a user-item worker, a gateway, redis): a Fit whose stream carries item texts, which the gateway encodes
with the text model, learns a content map; items held out of the Fit are folded in from their texts alone
and rank as the planted tastes say; and the bad requests get their statuses.

Planted: two genres of film; users 0..19 love comedies and hate horror films, users 20..39 the opposite.
Item texts name the genre ("a comedy film ..."), so only the content tells a new item's genre."""

import csv
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from embeddings_client import Client, FailedPrecondition
from tests.integration.test_cli import embeddings, ok_json
from tests.system import System

pytestmark = pytest.mark.integration

GENRES = ("comedy", "horror")
USERS, ITEMS_PER_GENRE, HELD_OUT_PER_GENRE, RATED_PER_USER = 40, 16, 3, 16
PARAMETERS = rec.FitParameters(epochs=60, learning_rate=0.05, l2=0.01, factors=4, validation_fraction=0.0)
THINGS = ("a haunted house", "a wedding", "a road trip", "a small town", "a dinner party", "a summer camp")


def text_of(genre: str, number: int) -> str:
    return f"a {genre} film about {THINGS[number % len(THINGS)]}, number {number}"


def item_of(genre: str, number: int) -> str:
    return f"{genre}-{number}"


def lover(user: int) -> str:
    return GENRES[user * len(GENRES) // USERS]


def fit_stream(model: str, with_content: bool = True) -> list[rec.FitRequest]:
    """Ratings of the first ITEMS_PER_GENRE - HELD_OUT_PER_GENRE items of each genre (5 for the genre the
    user loves, 1 for the other), and the texts of every item, held-out ones included (ignored: no
    interactions)."""
    rng = np.random.default_rng(5)
    trained = [(genre, n) for genre in GENRES for n in range(ITEMS_PER_GENRE - HELD_OUT_PER_GENRE)]
    interactions = []
    for user in range(USERS):
        for index in rng.choice(len(trained), RATED_PER_USER, replace=False):
            genre, number = trained[index]
            rating = 5.0 if genre == lover(user) else 1.0
            interactions.append(
                rec.Interaction(user_id=f"u{user}", item_id=item_of(genre, number), rating=rating)
            )
    content = [
        cpb.ItemContent(item_id=item_of(genre, n), inputs=[pb.Input(text=text_of(genre, n))])
        for genre in GENRES
        for n in range(ITEMS_PER_GENRE)
    ]
    half = len(interactions) // 2
    first = rec.FitRequest(
        model=model, kind=rec.MODEL_KIND_MF, parameters=PARAMETERS, interactions=interactions[:half]
    )
    second = rec.FitRequest(interactions=interactions[half:])
    if with_content:
        first.item_content.extend(content[:10])
        second.item_content.extend(content[10:])
    return [first, second]


def held_out() -> list[cpb.ItemContent]:
    return [
        cpb.ItemContent(item_id=item_of(genre, n), inputs=[pb.Input(text=text_of(genre, n))])
        for genre in GENRES
        for n in range(ITEMS_PER_GENRE - HELD_OUT_PER_GENRE, ITEMS_PER_GENRE)
    ]


def fit(stub: gateway_pb2_grpc.GatewayStub, requests: list[rec.FitRequest]) -> rec.FitProgress:
    *_, done = stub.Fit(iter(requests), timeout=300)
    assert done.done
    return done


@pytest.fixture(scope="module")
def stub(system: System) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(system.gateway.address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def fresh_model() -> str:
    return f"cold-{uuid.uuid4().hex[:8]}"


def test_items_held_out_of_the_fit_are_recommended_from_their_texts(
    stub: gateway_pb2_grpc.GatewayStub,
) -> None:
    model = fresh_model()
    done = fit(stub, fit_stream(model))
    text_model = next(
        card for card in stub.ListModels(enc.ListModelsRequest()).models if card.id == "all-MiniLM-L6-v2"
    )
    info = done.content_map
    assert info.space == text_model.space and info.dimension == text_model.dimension
    assert info.items == 2 * (ITEMS_PER_GENRE - HELD_OUT_PER_GENRE)

    new = held_out()
    folded = stub.FoldInItems(cpb.FoldInItemsRequest(model=model, items=new), timeout=60)
    assert folded.added == len(new) and folded.model.version != done.model.version
    ids = [content.item_id for content in new]
    for user in range(USERS):
        # among the new items only, the user's genre first: what only their texts can tell
        top = stub.Recommend(
            rec.RecommendRequest(user_id=f"u{user}", model=model, k=HELD_OUT_PER_GENRE, candidate_items=ids),
            timeout=30,
        )
        assert {hit.id.split("-")[0] for hit in top.items} == {lover(user)}, (user, top.items)
    # the gateway serves the new version's vectors for the new item ids at once
    encoded = stub.Encode(enc.EncodeRequest(model=model, inputs=[pb.Input(item_id=ids[0])]), timeout=30)
    assert encoded.model.version == folded.model.version

    again = stub.FoldInItems(cpb.FoldInItemsRequest(model=model, items=new[:1]), timeout=60)
    assert again.added == 0  # folded in before: replaced, not added twice


def test_bad_cold_start_requests_get_clear_statuses(stub: gateway_pb2_grpc.GatewayStub) -> None:
    model = fresh_model()
    fit(stub, fit_stream(model))
    new = held_out()[:1]
    models = stub.ListModels(enc.ListModelsRequest()).models
    minilm = next(card for card in models if card.id == "all-MiniLM-L6-v2")
    other = next(
        card.space for card in models if pb.INPUT_KIND_TEXT in card.input_kinds and card.space != minilm.space
    )

    with pytest.raises(grpc.RpcError) as wrong_space:
        stub.FoldInItems(cpb.FoldInItemsRequest(model=model, items=new, content_space=other), timeout=60)
    assert wrong_space.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert repr(other) in wrong_space.value.details() and repr(minilm.space) in wrong_space.value.details()

    plain = fresh_model()
    fit(stub, fit_stream(plain, with_content=False))
    with pytest.raises(grpc.RpcError) as no_map:
        stub.FoldInItems(cpb.FoldInItemsRequest(model=plain, items=new), timeout=60)
    assert no_map.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no content map" in no_map.value.details()

    with pytest.raises(grpc.RpcError) as learnt:
        stub.FoldInItems(
            cpb.FoldInItemsRequest(
                model=model,
                items=[cpb.ItemContent(item_id=item_of("comedy", 0), inputs=[pb.Input(text="x")])],
            ),
            timeout=60,
        )
    assert learnt.value.code() == grpc.StatusCode.ALREADY_EXISTS

    with pytest.raises(grpc.RpcError) as user_input:
        stub.FoldInItems(
            cpb.FoldInItemsRequest(
                model=model, items=[cpb.ItemContent(item_id="n", inputs=[pb.Input(user_id="u1")])]
            ),
            timeout=60,
        )
    assert user_input.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].inputs[0]" in user_input.value.details()

    ease = fit_stream(fresh_model())
    ease[0].kind = rec.MODEL_KIND_EASE
    with pytest.raises(grpc.RpcError) as ease_fit:
        fit(stub, ease)
    assert ease_fit.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item_content" in ease_fit.value.details()


def test_the_client_fits_with_item_content_and_folds_items_in(system: System) -> None:
    model = fresh_model()
    requests = fit_stream(model, with_content=False)
    interactions = [(i.user_id, i.item_id, i.rating) for request in requests for i in request.interactions]
    trained = {
        item_of(genre, n): text_of(genre, n)
        for genre in GENRES
        for n in range(ITEMS_PER_GENRE - HELD_OUT_PER_GENRE)
    }
    parameters = {name: getattr(PARAMETERS, name) for name in ("epochs", "learning_rate", "l2", "factors")}
    with Client(system.gateway.address) as client:
        *_, done = client.fit(
            interactions, model=model, kind="mf", parameters=parameters, item_content=trained
        )
        assert done.content_map is not None and done.content_map.items == len(trained)
        new = {content.item_id: content.inputs[0].text for content in held_out()}
        folded = client.fold_in_items(new, model=model)
        assert folded.added == len(new) and folded.vectors.shape == (len(new), PARAMETERS.factors)
        comedy_fan, horror_fan = "u0", f"u{USERS - 1}"
        for user, genre in ((comedy_fan, "comedy"), (horror_fan, "horror")):
            top = client.recommend(user, k=HELD_OUT_PER_GENRE, model=model, candidate_items=list(new))
            assert {hit.id.split("-")[0] for hit in top.items} == {genre}
        with pytest.raises(FailedPrecondition):
            client.fold_in_items({"x": np.ones(3, dtype=np.float32)}, model=model, content_space="elsewhere")


def test_the_cli_fits_with_a_content_file_and_folds_items_in(system: System, tmp_path: Path) -> None:
    model = fresh_model()
    ratings_file, content_file = tmp_path / "ratings.csv", tmp_path / "content.csv"
    with ratings_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "rating"])
        for request in fit_stream(model, with_content=False):
            writer.writerows((i.user_id, i.item_id, i.rating) for i in request.interactions)
    with content_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "text"])
        writer.writerows(
            (item_of(genre, n), text_of(genre, n))
            for genre in GENRES
            for n in range(ITEMS_PER_GENRE - HELD_OUT_PER_GENRE)
        )
    address = system.gateway.address
    params = [
        arg
        for name in ("epochs", "learning_rate", "l2", "factors")
        for arg in ("--param", f"{name}={getattr(PARAMETERS, name)}")
    ]
    fitted = embeddings(
        "fit",
        ratings_file,
        "--model",
        model,
        "--kind",
        "mf",
        "--content",
        content_file,
        *params,
        address=address,
    )
    assert fitted.returncode == 0, fitted.stderr
    assert "content map from space minilm (384-d)" in fitted.stdout
    new = held_out()
    pairs = [f"{content.item_id}={content.inputs[0].text}" for content in new]
    folded = ok_json(embeddings("--json", "fold-in-items", *pairs, "--model", model, address=address))
    assert folded["added"] == len(new) and np.array(folded["vectors"]).shape == (len(new), PARAMETERS.factors)
    shown = embeddings("fold-in-items", pairs[0], "--model", model, address=address)
    assert shown.returncode == 0 and "(0 new)" in shown.stdout
    wrong = embeddings("fold-in-items", "x", "--model", model, address=address)
    assert wrong.returncode == 2 and "ITEM=TEXT" in wrong.stderr
    refused = embeddings(
        "fold-in-items", "z=a film", "--model", model, "--content-space", "elsewhere", address=address
    )
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr  # no text model there
    assert "a model for text inputs in space 'elsewhere'" in refused.stderr
