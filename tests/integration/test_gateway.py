"""The gateway over real gRPC with a real Redis: routing, the vector cache, similarity, bad input."""

import uuid

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb

from tests.clip_checkpoint import TinyClip
from tests.helpers import cosine, metric, texts, vectors

pytestmark = pytest.mark.integration


def unique(label: str) -> str:
    """A sentence no other test sends, so it starts out uncached."""
    return f"{label} {uuid.uuid4().hex[:8]}"


def test_list_models_gathers_the_workers_models(gateway_stub, tiny_clip: TinyClip) -> None:
    ids = {m.id for m in gateway_stub.ListModels(enc.ListModelsRequest()).models}
    assert ids == {
        "all-MiniLM-L6-v2",
        f"{tiny_clip.space}-text",
        "efficientnet-lite0",
        "imagenet-label-space",
        "resnet18",
        f"{tiny_clip.space}-image",
    }


def test_encode_equals_sentence_transformers(gateway_stub, minilm) -> None:
    sentences = [unique("A quick brown fox"), unique("Vector search at scale")]
    response = gateway_stub.Encode(enc.EncodeRequest(inputs=texts(*sentences)))
    assert response.model.id == "all-MiniLM-L6-v2"  # the default text model
    assert np.all(cosine(vectors(response), minilm.encode(sentences)) >= 0.9999)


def test_second_call_is_served_from_the_cache(gateway_stub, gateway_service) -> None:
    sentence = unique("cache me")
    hits_before = metric(gateway_service.metrics_port, "cache_hits_total", model="all-MiniLM-L6-v2")
    first = gateway_stub.Encode(enc.EncodeRequest(inputs=texts(sentence)))
    second = gateway_stub.Encode(enc.EncodeRequest(inputs=texts(sentence)))
    assert [e.cached for e in first.embeddings] == [False]
    assert [e.cached for e in second.embeddings] == [True]
    assert np.array_equal(vectors(first), vectors(second))
    assert (
        metric(gateway_service.metrics_port, "cache_hits_total", model="all-MiniLM-L6-v2") == hits_before + 1
    )


def test_hits_and_misses_come_back_in_request_order(gateway_stub) -> None:
    a, b, c, d = (unique(label) for label in "abcd")
    gateway_stub.Encode(enc.EncodeRequest(inputs=texts(a, b)))
    mixed = gateway_stub.Encode(enc.EncodeRequest(inputs=texts(c, a, d, b, c)))
    assert [e.cached for e in mixed.embeddings] == [False, True, False, True, False]
    one_by_one = np.stack(
        [vectors(gateway_stub.Encode(enc.EncodeRequest(inputs=texts(s))))[0] for s in (c, a, d, b, c)]
    )
    assert np.allclose(vectors(mixed), one_by_one, atol=1e-6)


def test_encode_stream_answers_in_order_through_the_cache(gateway_stub, minilm) -> None:
    repeated = unique("streamed twice")
    requests = [
        enc.EncodeRequest(request_id=f"r{i}", inputs=texts(repeated, unique(f"s{i}"))) for i in range(10)
    ]
    responses = list(gateway_stub.EncodeStream(iter(requests)))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(10)]
    assert all(r.model.id == "all-MiniLM-L6-v2" and len(r.embeddings) == 2 for r in responses)
    for request, response in zip(requests, responses, strict=True):  # each answer holds its own vectors
        reference = minilm.encode([item.text for item in request.inputs], convert_to_numpy=True)
        assert np.all(cosine(vectors(response), reference) >= 0.9999), request.request_id
    assert sum(r.embeddings[0].cached for r in responses) >= 1  # later requests find the repeated sentence
    assert not any(r.embeddings[1].cached for r in responses)


def test_one_cache_entry_serves_every_option(gateway_stub) -> None:
    sentence = unique("options after the cache")
    full = vectors(gateway_stub.Encode(enc.EncodeRequest(inputs=texts(sentence))))[0]
    short = gateway_stub.Encode(
        enc.EncodeRequest(
            inputs=texts(sentence), options=pb.EncodeOptions(dimensions=64, dtype=pb.DTYPE_INT8)
        )
    )
    assert short.embeddings[0].cached
    got = vectors(short)[0]
    expected = full[:64] / np.linalg.norm(full[:64])
    assert got.shape == (64,) and np.allclose(got, expected, atol=0.01)


def test_truncation_is_reported_and_remembered_by_the_cache(gateway_stub) -> None:
    long_text = unique("long") + " word" * 400
    first = gateway_stub.Encode(enc.EncodeRequest(inputs=texts(long_text)))
    assert first.embeddings[0].truncated and first.embeddings[0].input_tokens == 256
    again = gateway_stub.Encode(enc.EncodeRequest(inputs=texts(long_text)))
    assert again.embeddings[0].cached and again.embeddings[0].truncated
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Encode(
            enc.EncodeRequest(inputs=texts("fine", long_text), options=pb.EncodeOptions(strict=True))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in caught.value.details() and "256" in caught.value.details()


def test_similarity_matrix_and_pairwise(gateway_stub) -> None:
    matrix = gateway_stub.Similarity(
        gw.SimilarityRequest(
            queries=texts("a cat sits on the mat", "stock prices fell sharply"),
            candidates=texts("a kitten resting on a rug", "the market dropped today", "a recipe for bread"),
        )
    )
    scores = np.array(matrix.scores).reshape(matrix.rows, matrix.cols)
    assert (matrix.rows, matrix.cols, matrix.space) == (2, 3, "minilm")
    assert scores[0].argmax() == 0 and scores[1].argmax() == 1
    pairwise = gateway_stub.Similarity(
        gw.SimilarityRequest(
            queries=texts("a cat sits on the mat", "stock prices fell sharply"),
            candidates=texts("a kitten resting on a rug", "the market dropped today"),
            mode=gw.SIMILARITY_MODE_PAIRWISE,
        )
    )
    assert np.allclose(pairwise.scores, [scores[0, 0], scores[1, 1]], atol=1e-5)


def test_similarity_across_spaces_is_refused_naming_both(gateway_stub, tiny_clip: TinyClip) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Similarity(
            gw.SimilarityRequest(
                queries=texts("a"), candidates=texts("b"), candidate_model=f"{tiny_clip.space}-text"
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'minilm'" in caught.value.details() and f"'{tiny_clip.space}'" in caught.value.details()


BAD_REQUESTS = {
    "empty batch": (lambda s: s.Encode(enc.EncodeRequest()), "inputs is empty"),
    "empty string among cached ones": (
        lambda s: s.Encode(enc.EncodeRequest(inputs=texts("hello", ""))),
        "inputs[1].text",
    ),
    "unknown model": (
        lambda s: s.Encode(enc.EncodeRequest(model="nope", inputs=texts("a"))),
        "'nope' is not served",
    ),
    "image the text model cannot take": (
        lambda s: s.Encode(enc.EncodeRequest(model="all-MiniLM-L6-v2", inputs=[pb.Input(image=b"x")])),
        "does not accept image inputs",
    ),
    "mixed kinds, no model": (
        lambda s: s.Encode(enc.EncodeRequest(inputs=[pb.Input(text="a"), pb.Input(image=b"x")])),
        "name a model",
    ),
    "batch above the maximum": (
        lambda s: s.Encode(enc.EncodeRequest(inputs=texts(*["x"] * 257))),
        "limit is 256",
    ),
    "dimensions above the model's": (
        lambda s: s.Encode(enc.EncodeRequest(inputs=texts("a"), options=pb.EncodeOptions(dimensions=1000))),
        "options.dimensions=1000",
    ),
    "unknown dtype": (
        lambda s: s.Encode(enc.EncodeRequest(inputs=texts("a"), options=pb.EncodeOptions(dtype=7))),
        "options.dtype=7",
    ),
    "pairwise of unequal lengths": (
        lambda s: s.Similarity(
            gw.SimilarityRequest(
                queries=texts("a"), candidates=texts("b", "c"), mode=gw.SIMILARITY_MODE_PAIRWISE
            )
        ),
        "as many candidates as queries",
    ),
    "similarity with no candidates": (
        lambda s: s.Similarity(gw.SimilarityRequest(queries=texts("a"))),
        "candidates is empty",
    ),
    "empty candidate text": (
        lambda s: s.Similarity(gw.SimilarityRequest(queries=texts("a"), candidates=texts("b", " "))),
        "candidates[1]",
    ),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_invalid_argument_and_gateway_keeps_serving(gateway_stub, name: str) -> None:
    call, fragment = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as caught:
        call(gateway_stub)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert fragment in caught.value.details()
    assert len(gateway_stub.Encode(enc.EncodeRequest(inputs=texts("still serving"))).embeddings) == 1


def test_calls_that_need_later_services_say_so(gateway_stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Recommend(rec.RecommendRequest(user_id="u1", k=5))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "user-item worker" in caught.value.details()


def test_search_without_index_shards_is_unavailable_and_says_which_setting(gateway_stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        gateway_stub.Search(gw.SearchRequest(input=pb.Input(text="cat"), k=5))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "GATEWAY_INDEX_SHARDS" in caught.value.details()


def test_health_and_reflection_are_on(gateway_service, text_service, image_service) -> None:
    """grpcurl and Kubernetes gRPC probes work out of the box: reflection lists the services."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from harness.processes import health_status

    for service, expected in (
        (gateway_service, "embeddings.v1.Gateway"),
        (text_service, "embeddings.v1.Encoder"),
        (image_service, "embeddings.v1.Encoder"),
    ):
        assert health_status(service.address) == "SERVING"
        with grpc.insecure_channel(service.address) as channel:
            names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {expected, "grpc.health.v1.Health"} <= names, names
