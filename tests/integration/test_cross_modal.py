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
