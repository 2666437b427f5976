"""The Python client (embeddings_client) against the real system: every call of `Client` and of
`AsyncClient`, vectors as numpy arrays with the model and version, TLS with a client certificate and a
bearer token, and gRPC errors as typed exceptions carrying the status code and the service's message."""

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc as enc_grpc
from embeddings.v1 import types_pb2 as pb
from PIL import Image

from embeddings_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    EmbeddingsError,
    FitProgress,
    InvalidArgument,
    Item,
    NotFound,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from harness.processes import RedisServer, Service, free_port
from services.common.vectors import from_wire
from services.gateway.cache import cache_key
from tests import image_files
from tests.system import TOKEN, SecureGateway, System, ratings

pytestmark = pytest.mark.integration

MINILM = "all-MiniLM-L6-v2"
LABEL_SPACE = "imagenet-label-space"
MODEL = "client-mf"


@pytest.fixture(scope="module")
def client(system: System) -> Iterator[Client]:
    with Client(system.gateway.address) as connected:
        yield connected


@pytest.fixture(scope="module")
def fitted(client: Client) -> list[FitProgress]:
    return list(client.fit(ratings(), model=MODEL, chunk_size=25))


def test_encode_text_gives_a_numpy_matrix_with_the_model_and_its_version(client: Client) -> None:
    texts = ["client: a cat sits on the mat", "client: stocks fell"]
    first = client.encode_text(texts)
    again = client.encode_text(texts)
    served = {model.id: model for model in client.list_models()}
    assert first.vectors.shape == (2, 384) and first.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(first.vectors, axis=1), 1.0, atol=1e-5)
    assert (first.model.id, first.model.version, first.model.space) == (
        MINILM,
        served[MINILM].version,
        "minilm",
    )
    assert first.cached == (False, False) and again.cached == (True, True)
    assert np.array_equal(first.vectors, again.vectors)
    assert len(first) == 2 and first.input_tokens[0] > 0 and first.truncated == (False, False)


def test_encode_text_options_shape_the_vectors(client: Client) -> None:
    full = client.encode_text("client: options").vectors[0]
    short = client.encode_text("client: options", dimensions=16).vectors[0]
    half = client.encode_text("client: options", dtype="float16").vectors[0]
    assert short.shape == (16,) and np.isclose(np.linalg.norm(short), 1.0, atol=1e-5)
    assert np.allclose(short, full[:16] / np.linalg.norm(full[:16]), atol=1e-5)
    assert np.allclose(half, full, atol=1e-3)


def test_encode_image_takes_bytes_a_path_or_a_pil_image(client: Client, tmp_path: Path) -> None:
    png = image_files.photo("chelsea", "PNG", size=(160, 106))
    path = tmp_path / "chelsea.png"
    path.write_bytes(png)
    with Image.open(path) as picture:
        result = client.encode_image([png, path, str(path), picture], model="efficientnet-lite0")
    assert (
        result.vectors.shape == (4, 1280) and result.model.id == "efficientnet-lite0" and result.model.version
    )
    assert np.allclose(result.vectors, result.vectors[0], atol=1e-5)  # the same pixels, four ways


def test_similarity_compares_a_text_with_photos_and_pairs(client: Client) -> None:
    cat, coffee = image_files.photo("chelsea", "JPEG"), image_files.photo("coffee", "JPEG")
    matrix = client.similarity(["a photo of a cat"], [cat, coffee])
    pairs = client.similarity(["a kitten", "stocks fell"], ["a cat", "the market dropped"], pairwise=True)
    assert matrix.scores.shape == (1, 2) and matrix.scores[0, 0] > matrix.scores[0, 1]
    assert (matrix.space, matrix.query_model.id, matrix.candidate_model.id) == ("minilm", MINILM, LABEL_SPACE)
    assert pairs.scores.shape == (2,) and np.all(pairs.scores > 0.3)


def test_upsert_search_and_delete(client: Client) -> None:
    captions = {"client-cat": "a cat curled up on a sofa", "client-coffee": "an espresso in a cup"}
    items = [Item(id, text=text, payload={"suite": "client", "text": text}) for id, text in captions.items()]
    assert client.upsert(items) == 2
    found = client.search("a kitten", k=2, kinds=["text"], where={"suite": "client"})
    assert [hit.id for hit in found.hits] == ["client-cat", "client-coffee"]
    assert found.hits[0].payload == {"suite": "client", "text": captions["client-cat"]}
    assert found.hits[0].kind == "text" and found.space == "minilm" and not found.partial
    assert found.query_model.id == MINILM and found.hits[0].score > found.hits[1].score

    vectors = np.eye(4, dtype=np.float32)
    assert (
        client.upsert([Item(f"own-{n}", vector=row) for n, row in enumerate(vectors)], space="client-own")
        == 4
    )
    nearest = client.search(np.array([0.1, 0.0, 1.0, 0.0]), space="client-own", k=1)
    assert [hit.id for hit in nearest.hits] == ["own-2"] and nearest.hits[0].payload is None

    deleted = client.delete(["client-coffee", "never-indexed"], space="minilm")
    assert (deleted.deleted, deleted.not_found) == (1, 1)
    after = client.search("a kitten", k=5, kinds=["text"], where={"suite": "client"})
    assert [hit.id for hit in after.hits] == ["client-cat"]

    dropped = client.drop_space("client-own")
    assert (dropped.dropped, dropped.missing_shards) == (4, [])
    with pytest.raises(InvalidArgument, match="'client-own' is unknown"):
        client.search(np.array([0.1, 0.0, 1.0, 0.0]), space="client-own", k=1)
    with pytest.raises(NotFound):
        client.drop_space("client-own")
    assert client.upsert([Item("again", vector=np.ones(7, dtype=np.float32))], space="client-own") == 1


def test_upsert_stream_acknowledges_each_batch_with_its_ids(client: Client, system: System) -> None:
    batches = [
        [Item(f"stream-{b}-{i}", vector=np.eye(3)[i], payload={"b": str(b)}) for i in range(3)]
        for b in range(4)
    ]
    acks = list(client.upsert_stream(batches, space="client-stream"))
    assert [ack.ids for ack in acks] == [tuple(item.id for item in batch) for batch in batches]
    assert [ack.upserted for ack in acks] == [3, 3, 3, 3]
    assert system.indexed("client-stream") == 12


def test_fit_streams_progress_then_recommend_uses_the_new_version(
    client: Client, fitted: list[FitProgress]
) -> None:
    last = fitted[-1]
    assert last.done and last.model is not None and last.model.id == MODEL and last.model.version
    assert (last.users, last.items, last.interactions) == (12, 10, 72)
    assert all(not progress.done for progress in fitted[:-1]) and fitted[0].epochs >= fitted[0].epoch >= 1
    recommended = client.recommend("u0", k=3, model=MODEL)
    assert len(recommended.items) == 3 and recommended.model.version == last.model.version
    seen = {item for user, item, _ in ratings() if user == "u0"}
    assert not seen & {hit.id for hit in recommended.items}
    with_seen = client.recommend("u0", k=10, model=MODEL, include_seen=True)
    assert len(with_seen.items) == 10


def test_ease_fit_score_and_recommend_options_through_the_gateway(client: Client) -> None:
    progress = list(client.fit(ratings(), model="client-ease", kind="ease", parameters={"l2": 10.0}))
    assert progress[-1].done and progress[-1].kind == "ease" and progress[-1].model is not None
    recommended = client.recommend("u0", k=4, model="client-ease")
    scored = client.score("u0", [hit.id for hit in recommended.items], model="client-ease")
    assert [hit.id for hit in scored.items] == [hit.id for hit in recommended.items]
    assert np.allclose([h.score for h in scored.items], [h.score for h in recommended.items], atol=1e-5)
    assert scored.model.version == recommended.model.version == progress[-1].model.version
    top = recommended.items[0].id
    excluded = client.recommend("u0", k=4, model="client-ease", exclude_items=[top])
    assert top not in {hit.id for hit in excluded.items}
    kept = client.recommend("u0", k=4, model="client-ease", candidate_items=["i7", "i8"])
    assert {hit.id for hit in kept.items} <= {"i7", "i8"} and not kept.fallback
    fallback = client.recommend("somebody-new", k=3, model="client-ease", fallback_below=1)
    assert fallback.fallback and len(fallback.items) == 3
    with pytest.raises(NotFound, match="no-such-item"):
        client.score("u0", ["no-such-item"], model="client-ease")
    with pytest.raises(InvalidArgument, match=r"parameters\.l2"):
        list(client.fit(ratings(), model="client-ease", kind="ease", parameters={"l2": -1.0}))
    with pytest.raises(ValueError, match="not a Fit parameter"):
        client.fit(ratings(), model="client-ease", parameters={"lambda": 1.0})


def test_explicit_scores_stay_inside_the_rating_scale(client: Client, fitted: list[FitProgress]) -> None:
    items = [f"i{n}" for n in range(10)]
    for user in ("u0", "u5", "u11"):
        scored = client.score(user, items, model=MODEL)
        assert [hit.id for hit in scored.items] == items
        assert all(0.5 <= hit.score <= 5.0 for hit in scored.items)
        recommended = client.recommend(user, k=3, model=MODEL)
        by_id = {hit.id: hit.score for hit in scored.items}
        assert np.allclose([by_id[hit.id] for hit in recommended.items], [h.score for h in recommended.items])


def test_vectors_are_stored_at_unit_length_so_scores_are_cosines(client: Client) -> None:
    """Vectors of very different lengths: a score is the cosine, whatever the lengths of the stored vector
    and the query (an inner product with a vector that was not normalised would scale with its length)."""
    rng = np.random.default_rng(23)
    lengths = np.array([[0.01], [3.0], [250.0], [1.0], [0.5]], dtype=np.float32)
    vectors = (rng.normal(size=(5, 6)) * lengths).astype(np.float32)
    query = (rng.normal(size=6) * 40).astype(np.float32)
    space = "client-lengths"
    assert client.upsert([Item(f"len-{n}", vector=row) for n, row in enumerate(vectors)], space=space) == 5
    found = client.search(query, space=space, k=5)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = unit @ (query / np.linalg.norm(query))
    assert [hit.id for hit in found.hits] == [f"len-{n}" for n in np.argsort(-cosines)]
    assert np.allclose([hit.score for hit in found.hits], np.sort(cosines)[::-1], atol=1e-5)
    client.drop_space(space)


REFIT_MODEL = "client-refit"


def test_after_a_refit_ids_are_encoded_and_cached_under_the_new_version(
    client: Client, system: System, redis_server: RedisServer
) -> None:
    users = ["u0", "u1", "u2"]
    first = list(client.fit(ratings(), model=REFIT_MODEL))[-1].model
    assert first is not None
    old = client.encode_users(users, model=REFIT_MODEL)
    assert old.model.version == first.version and client.encode_users(users, model=REFIT_MODEL).cached == (
        True,
        True,
        True,
    )

    second = list(client.fit(ratings(users=13), model=REFIT_MODEL))[-1].model  # other data: a new version
    assert second is not None and second.version != first.version
    # At once (not after the gateway's next refresh of its model list): the new version's vectors, from the
    # worker, not the old version's from the cache.
    new = client.encode_users(users, model=REFIT_MODEL)
    assert new.model.version == second.version and new.cached == (False, False, False)
    with grpc.insecure_channel(system.useritem.address) as channel:
        direct = enc_grpc.EncoderStub(channel).Encode(
            enc.EncodeRequest(model=REFIT_MODEL, inputs=[pb.Input(user_id=user) for user in users]),
            timeout=30,
        )
    assert direct.model.version == second.version
    assert np.allclose(new.vectors, np.stack([from_wire(e.vector) for e in direct.embeddings]), atol=1e-6)
    assert not np.allclose(new.vectors, old.vectors, atol=1e-3)
    with redis.Redis(port=redis_server.port) as cache:
        for user in users:
            assert cache.exists(cache_key(REFIT_MODEL, second.version, pb.Input(user_id=user))) == 1, user
    again = client.encode_users(users, model=REFIT_MODEL)
    assert again.model.version == second.version and again.cached == (True, True, True)
    assert np.allclose(again.vectors, new.vectors, atol=1e-6)


def test_encode_stream_answers_each_batch_in_order(client: Client) -> None:
    texts = [["stream: a cat", "stream: a dog"], ["stream: stocks fell"]]
    photo = image_files.photo("chelsea", "JPEG")
    answers = list(client.encode_stream([texts[0], [photo], texts[1]]))
    assert [len(answer) for answer in answers] == [2, 1, 1]
    assert [answer.model.id for answer in answers] == [MINILM, "efficientnet-lite0", MINILM]
    assert np.allclose(answers[0].vectors, client.encode_text(texts[0]).vectors, atol=1e-6)
    assert np.allclose(answers[2].vectors, client.encode_text(texts[1]).vectors, atol=1e-6)
    assert np.allclose(answers[1].vectors, client.encode_image(photo).vectors, atol=1e-6)
    short = list(client.encode_stream([texts[0]], dimensions=8, dtype="float16"))
    assert short[0].vectors.shape == (2, 8)
    with pytest.raises(InvalidArgument, match=r"inputs\[1\]\.text"):
        list(client.encode_stream([["fine", " "]]))


def test_encode_users_and_items_similar_items_and_fold_in(client: Client, fitted: list[FitProgress]) -> None:
    version = fitted[-1].model.version if fitted[-1].model else ""
    items = [f"i{n}" for n in range(10)]
    item_vectors = client.encode_items(items, model=MODEL)
    users = client.encode_users(["u0", "u1"], model=MODEL, normalize=False)
    assert item_vectors.vectors.shape == (10, 4) and users.vectors.shape == (2, 4)
    assert item_vectors.model.version == users.model.version == version
    # SimilarItems ranks by the cosine of the item vectors that Encode returns
    cosine = item_vectors.vectors @ item_vectors.vectors[3]
    expected = [items[n] for n in np.argsort(-cosine) if items[n] != "i3"][:4]
    similar = client.similar_items("i3", k=4, model=MODEL)
    assert [hit.id for hit in similar.items] == expected and similar.model.version == version
    assert np.allclose([hit.score for hit in similar.items], np.sort(cosine)[::-1][1:5], atol=1e-4)
    # FoldIn: a vector of the model's dimension for a new user, and items other than those rated
    rated = {"i0": 5.0, "i1": 4.0, "i2": 1.0}
    folded = client.fold_in(rated, k=3, model=MODEL)
    assert folded.vector.shape == (4,) and folded.model.version == version
    assert len(folded.items) == 3 and not {hit.id for hit in folded.items} & set(rated)
    assert [hit.score for hit in folded.items] == sorted((hit.score for hit in folded.items), reverse=True)
    assert np.allclose(client.fold_in(list(rated.items()), k=0, model=MODEL).vector, folded.vector)
    with_seen = client.fold_in(rated, k=10, model=MODEL, include_seen=True)
    assert set(rated) <= {hit.id for hit in with_seen.items}
    with pytest.raises(NotFound, match="never-rated"):
        client.fold_in({"never-rated": 5.0}, model=MODEL)
    with pytest.raises(NotFound, match="nobody"):
        client.similar_items("nobody", model=MODEL)


def test_list_models_and_health(client: Client) -> None:
    models = {model.id: model for model in client.list_models()}
    assert models[MINILM].dimension == 384 and models[MINILM].input_kinds == ("text",)
    assert models[LABEL_SPACE].space == "minilm" and models[LABEL_SPACE].input_kinds == ("image",)
    assert client.health() == "SERVING"


# --- errors -------------------------------------------------------------------------------------------


def test_bad_input_is_invalid_argument_with_the_services_message(client: Client) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.encode_text(["fine", "  "])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1].text" in caught.value.message and "INVALID_ARGUMENT" in str(caught.value)
    with pytest.raises(InvalidArgument, match="k"):
        client.search("a kitten", k=0)


def test_unknown_user_is_not_found(client: Client, fitted: list[FitProgress]) -> None:
    with pytest.raises(NotFound) as caught:
        client.recommend("nobody", model=MODEL)
    assert "nobody" in caught.value.message and isinstance(caught.value, EmbeddingsError)


def test_a_gateway_without_a_user_item_worker_is_unimplemented(gateway_service: Service) -> None:
    with Client(gateway_service.address) as plain, pytest.raises(Unimplemented, match="GATEWAY_USERITEM"):
        plain.recommend("u0")


def test_a_deadline_too_short_is_deadline_exceeded(client: Client) -> None:
    with pytest.raises(DeadlineExceeded):
        client.encode_image(image_files.noise_png(512, seed=7), timeout_s=0.001)


def test_nothing_listening_is_unavailable_after_bounded_retries() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.05)
    started = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", retry=policy, timeout_s=5) as nowhere, pytest.raises(Unavailable):
        nowhere.list_models()
    assert time.monotonic() - started < 5


def test_tls_with_a_client_certificate_and_a_token(locked_gateway: SecureGateway) -> None:
    address, ca, caller = locked_gateway.service.address, locked_gateway.ca.cert_path, locked_gateway.client
    tls = {"ca": ca, "cert": caller.cert, "key": caller.key}
    with Client(address, token=TOKEN, **tls) as allowed:
        assert allowed.encode_text("over tls").vectors.shape == (1, 384)
    with Client(address, token="wrong", **tls) as wrong, pytest.raises(Unauthenticated, match="not accepted"):
        wrong.list_models()
    with Client(address, **tls) as anonymous, pytest.raises(Unauthenticated, match="Bearer"):
        anonymous.list_models()
    no_retry = RetryPolicy(max_attempts=1)
    with Client(address, token=TOKEN, ca=ca, retry=no_retry) as no_cert, pytest.raises(Unavailable):
        no_cert.list_models()


# --- asyncio -----------------------------------------------------------------------------------------


async def test_the_async_client_makes_the_same_calls(system: System, fitted: list[FitProgress]) -> None:
    async with AsyncClient(system.gateway.address) as client:
        encoded = await client.encode_text(["async: a cat", "async: a dog"])
        image = await client.encode_image(image_files.photo("coffee", "JPEG"), model=LABEL_SPACE)
        score = await client.similarity(["a cup of coffee"], [image_files.photo("coffee", "JPEG")])
        assert await client.upsert([Item("async-cat", text="async: a cat", payload={"suite": "async"})]) == 1
        acks = [ack async for ack in client.upsert_stream([[Item("async-dog", text="async: a dog")]])]
        found = await client.search("a kitten", where={"suite": "async"})
        deleted = await client.delete(["async-cat", "async-dog"], space="minilm")
        progress = [step async for step in client.fit(ratings(), model="client-async-mf")]
        recommended = await client.recommend("u1", k=2, model="client-async-mf")
        similar = await client.similar_items("i1", k=2, model="client-async-mf")
        folded = await client.fold_in({"i1": 5.0, "i2": 3.0}, k=2, model="client-async-mf")
        item_vectors = await client.encode_items(["i1", "i2"], model="client-async-mf")
        streamed = [answer async for answer in client.encode_stream([["async: a cat"], ["async: a dog"]])]
        models = await client.list_models()
        status = await client.health()
        with pytest.raises(NotFound):
            await client.recommend("nobody", model=MODEL)
    assert encoded.vectors.shape == (2, 384) and encoded.model.id == MINILM
    assert image.vectors.shape == (1, 384) and image.model.id == LABEL_SPACE
    assert score.scores.shape == (1, 1) and score.scores[0, 0] > 0.3
    assert [ack.ids for ack in acks] == [("async-dog",)]
    assert [hit.id for hit in found.hits] == ["async-cat"] and deleted.deleted == 2
    assert progress[-1].done and progress[-1].model is not None
    assert recommended.model.version == progress[-1].model.version and len(recommended.items) == 2
    assert len(similar.items) == 2 and "i1" not in {hit.id for hit in similar.items}
    assert folded.vector.shape == (4,) and len(folded.items) == 2 and item_vectors.vectors.shape == (2, 4)
    assert np.allclose(np.concatenate([answer.vectors for answer in streamed]), encoded.vectors, atol=1e-6)
    assert MINILM in {model.id for model in models} and status == "SERVING"
