"""Images through the gateway: routing, the cache, and Similarity across modalities within one space."""

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import types_pb2 as pb

from tests.clip_checkpoint import TinyClip
from tests.helpers import images, texts
from tests.image_files import photo

pytestmark = pytest.mark.integration

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "coins", "horse", "camera", "clock"]


@pytest.fixture(scope="module")
def photo_inputs() -> list[pb.Input]:
    return images(*(photo(name, "JPEG") for name in PHOTOS))


def scores(response: gw.SimilarityResponse) -> np.ndarray:
    return np.array(response.scores).reshape(response.rows, response.cols)


@pytest.mark.parametrize(
    ("query", "expected"),
    [("a photo of a cat", "chelsea"), ("a cup of coffee", "coffee"), ("a rocket", "rocket")],
)
def test_text_query_finds_its_photo_through_the_label_space(
    gateway_stub, photo_inputs, query, expected
) -> None:
    response = gateway_stub.Similarity(gw.SimilarityRequest(queries=texts(query), candidates=photo_inputs))
    assert response.space == "minilm"
    assert (response.query_model.id, response.candidate_model.id) == (
        "all-MiniLM-L6-v2",
        "imagenet-label-space",
    )
    ranked = [PHOTOS[i] for i in np.argsort(-scores(response)[0])]
    assert ranked[0] == expected, ranked


def test_image_query_against_texts_picks_the_shared_space(gateway_stub, photo_inputs) -> None:
    captions = ["a photo of a cat", "a cup of coffee", "a rocket on its launch pad"]
    response = gateway_stub.Similarity(
        gw.SimilarityRequest(queries=[photo_inputs[PHOTOS.index("coffee")]], candidates=texts(*captions))
    )
    assert response.space == "minilm"
    assert int(np.argmax(scores(response)[0])) == 1


def test_image_against_images_uses_the_default_image_model(gateway_stub, photo_inputs) -> None:
    response = gateway_stub.Similarity(
        gw.SimilarityRequest(queries=photo_inputs[:2], candidates=photo_inputs)
    )
    assert response.space == "efficientnet-lite0"
    matrix = scores(response)
    assert np.allclose(np.diag(matrix[:, :2]), 1.0, atol=1e-5)
    assert np.all(np.argmax(matrix, axis=1) == [0, 1])


def test_clip_text_against_clip_images_in_the_clip_space(
    gateway_stub, photo_inputs, tiny_clip: TinyClip
) -> None:
    response = gateway_stub.Similarity(
        gw.SimilarityRequest(
            queries=texts("a cat"), candidates=photo_inputs[:3], query_model=f"{tiny_clip.space}-text"
        )
    )
    assert response.space == tiny_clip.space
    assert response.candidate_model.id == f"{tiny_clip.space}-image"
    assert (response.rows, response.cols) == (1, 3)


def test_models_of_different_spaces_are_refused_naming_both(gateway_stub, photo_inputs) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Similarity(
            gw.SimilarityRequest(
                queries=texts("a cat"), candidates=photo_inputs[:1], candidate_model="efficientnet-lite0"
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'minilm'" in caught.value.details() and "'efficientnet-lite0'" in caught.value.details()


def test_images_are_cached_by_content(gateway_stub) -> None:
    payload = photo("coins", "PNG", size=(190, 150))
    first, second = (gateway_stub.Encode(enc.EncodeRequest(inputs=images(payload))) for _ in range(2))
    assert first.model.id == "efficientnet-lite0"
    assert (first.embeddings[0].cached, second.embeddings[0].cached) == (False, True)
    assert first.embeddings[0].vector.data == second.embeddings[0].vector.data


def test_a_bad_image_gets_invalid_argument_with_the_callers_index(gateway_stub, photo_inputs) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Encode(enc.EncodeRequest(inputs=[photo_inputs[0], *images(b"not an image")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1].image" in caught.value.details()


def _encoded(gateway_stub, model: str, inputs: list[pb.Input]) -> np.ndarray:  # type: ignore[no-untyped-def]
    response = gateway_stub.Encode(
        enc.EncodeRequest(model=model, inputs=inputs, options=pb.EncodeOptions(normalize=False)), timeout=60
    )
    return np.stack([np.frombuffer(e.vector.data, dtype="<f4") for e in response.embeddings])


def _cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left = left / np.linalg.norm(left, axis=1, keepdims=True)
    right = right / np.linalg.norm(right, axis=1, keepdims=True)
    return left @ right.T


def test_similarity_scores_are_the_cosines_of_the_vectors_encode_returns(gateway_stub, photo_inputs) -> None:
    """Every score, not only the best, equals the cosine of the two vectors Encode gives for the same inputs:
    texts against texts, texts against photos in the label space, and pairwise."""
    queries = texts("a photo of a cat", "a steaming cup of coffee", "the launch of a rocket")
    captions = texts("a cat lying on a sofa", "coffee in a white mug", "a spacecraft taking off", "a horse")
    text_vectors = _encoded(gateway_stub, "all-MiniLM-L6-v2", queries)
    caption_vectors = _encoded(gateway_stub, "all-MiniLM-L6-v2", captions)
    photo_vectors = _encoded(gateway_stub, "imagenet-label-space", photo_inputs)

    text_to_text = gateway_stub.Similarity(
        gw.SimilarityRequest(queries=queries, candidates=captions), timeout=60
    )
    np.testing.assert_allclose(scores(text_to_text), _cosines(text_vectors, caption_vectors), atol=1e-5)

    text_to_photos = gateway_stub.Similarity(
        gw.SimilarityRequest(queries=queries, candidates=photo_inputs), timeout=60
    )
    assert (text_to_photos.space, text_to_photos.candidate_model.id) == ("minilm", "imagenet-label-space")
    np.testing.assert_allclose(scores(text_to_photos), _cosines(text_vectors, photo_vectors), atol=1e-5)

    pairwise = gateway_stub.Similarity(
        gw.SimilarityRequest(queries=queries, candidates=captions[:3], mode=gw.SIMILARITY_MODE_PAIRWISE),
        timeout=60,
    )
    np.testing.assert_allclose(
        pairwise.scores, np.diag(_cosines(text_vectors, caption_vectors[:3])), atol=1e-5
    )
