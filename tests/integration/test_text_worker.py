"""The text worker over real gRPC: vectors equal the reference libraries', bad input is refused clearly."""

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc
from embeddings.v1 import types_pb2 as pb

from harness.processes import running, text_worker
from tests.clip_checkpoint import TinyClip
from tests.helpers import cosine, metric, texts, vectors

pytestmark = pytest.mark.integration

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome!",
    "Kubernetes schedules pods onto nodes.",
    "Ein Hund läuft über die Wiese. 🐕",
    "word " * 400,  # longer than MiniLM's 256 tokens: truncated, like sentence-transformers does
]


def test_list_models_names_both_backends(worker_stub, tiny_clip: TinyClip) -> None:
    models = {m.id: m for m in worker_stub.ListModels(enc.ListModelsRequest()).models}
    minilm = models["all-MiniLM-L6-v2"]
    assert (minilm.dimension, minilm.space, minilm.max_input_tokens) == (384, "minilm", 256)
    assert list(minilm.input_kinds) == [pb.INPUT_KIND_TEXT]
    assert len(minilm.version) == 12
    clip = models[f"{tiny_clip.space}-text"]
    assert (clip.dimension, clip.space, clip.max_input_tokens) == (32, tiny_clip.space, 77)


def test_encode_equals_sentence_transformers(worker_stub, minilm) -> None:
    response = worker_stub.Encode(enc.EncodeRequest(model="all-MiniLM-L6-v2", inputs=texts(*SENTENCES)))
    assert response.model.id == "all-MiniLM-L6-v2" and response.model.version
    expected = minilm.encode(SENTENCES, convert_to_numpy=True)
    got = vectors(response)
    assert got.shape == (len(SENTENCES), 384)
    assert np.all(cosine(got, expected) >= 0.9999)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert [e.truncated for e in response.embeddings] == [False, False, False, False, True]
    assert response.embeddings[-1].input_tokens == 256


def test_clip_text_tower_equals_open_clip(worker_stub, tiny_clip: TinyClip) -> None:
    import torch

    model, tokenizer, _ = tiny_clip.load_reference()
    with torch.inference_mode():
        expected = model.encode_text(tokenizer(SENTENCES[:4])).numpy()
    response = worker_stub.Encode(
        enc.EncodeRequest(
            model=f"{tiny_clip.space}-text",
            inputs=texts(*SENTENCES[:4]),
            options=pb.EncodeOptions(normalize=False),
        )
    )
    got = vectors(response)
    assert np.all(cosine(got, expected) >= 0.9999)
    assert np.allclose(got, expected, atol=1e-4)
    assert response.model.space == tiny_clip.space


def test_options_shape_the_vectors(worker_stub) -> None:
    request = enc.EncodeRequest(
        inputs=texts("hello"), options=pb.EncodeOptions(dimensions=128, dtype=pb.DTYPE_FLOAT16)
    )
    vector = worker_stub.Encode(request).embeddings[0].vector
    assert (vector.dim, vector.dtype, len(vector.data)) == (128, pb.DTYPE_FLOAT16, 256)
    assert abs(np.linalg.norm(np.frombuffer(vector.data, "<f2").astype(np.float32)) - 1) < 1e-2
    binary = worker_stub.Encode(
        enc.EncodeRequest(inputs=texts("hello"), options=pb.EncodeOptions(dtype=pb.DTYPE_BINARY))
    )
    assert len(binary.embeddings[0].vector.data) == 384 // 8


def test_encode_stream_answers_in_order(worker_stub, minilm) -> None:
    sentences = [
        f"sentence number {i} of a stream about {topic}" for i, topic in enumerate(["cats", "tax"] * 6)
    ]
    requests = [enc.EncodeRequest(request_id=f"r{i}", inputs=texts(s)) for i, s in enumerate(sentences)]
    responses = list(worker_stub.EncodeStream(iter(requests)))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(12)]
    assert all(len(r.embeddings) == 1 for r in responses)
    got = np.stack([vectors(r)[0] for r in responses])  # each answer holds its own request's vector
    assert np.all(cosine(got, minilm.encode(sentences, convert_to_numpy=True)) >= 0.9999)


async def test_concurrent_requests_of_mixed_lengths(text_service, minilm) -> None:
    """Many single-sentence calls at once: tokenising (prepare thread) and the model (batch thread)
    overlap, and must not share tokenizer state."""
    async with grpc.aio.insecure_channel(text_service.address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        sentences = [" ".join(["word"] * (1 + i % 40)) + f" {i}" for i in range(96)]
        calls = [stub.Encode(enc.EncodeRequest(inputs=texts(s)), timeout=60) for s in sentences]
        responses = await asyncio.gather(*calls)
    assert all(len(r.embeddings) == 1 and r.embeddings[0].vector.dim == 384 for r in responses)
    tokens = [r.embeddings[0].input_tokens for r in responses]
    assert tokens == [len(s.split()) + 2 for s in sentences]
    got = np.stack([vectors(r)[0] for r in responses])  # and the vectors are each sentence's own
    assert np.all(cosine(got, minilm.encode(sentences, convert_to_numpy=True)) >= 0.9999)


async def test_a_stream_the_caller_cancels_leaves_the_worker_answering(text_service) -> None:
    """The worker answers again after a cancelled stream and counts the stream, but not as a failure.

    The count may be CANCELLED or OK: when the caller cancels, gRPC can hand the handler the end
    of the request stream before it cancels the handler, which then finishes normally (a race in
    gRPC, not in the worker; the caller sees CANCELLED either way)."""
    counted = {
        code: metric(text_service.metrics_port, "rpc_requests_total", method="EncodeStream", code=code)
        for code in ("CANCELLED", "OK")
    }
    async with grpc.aio.insecure_channel(text_service.address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)

        async def endless():  # type: ignore[no-untyped-def]
            for i in range(10_000):
                yield enc.EncodeRequest(request_id=str(i), inputs=texts(f"stream {i}"))
                await asyncio.sleep(0.01)

        call = stub.EncodeStream(endless())
        assert (await call.read()).request_id == "0"
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        await asyncio.sleep(0.5)
        assert len((await stub.Encode(enc.EncodeRequest(inputs=texts("after")))).embeddings) == 1
    recounted = {
        code: metric(text_service.metrics_port, "rpc_requests_total", method="EncodeStream", code=code)
        for code in counted
    }
    assert sum(recounted.values()) == sum(counted.values()) + 1, (counted, recounted)
    for code in ("INTERNAL", "UNKNOWN"):
        assert metric(text_service.metrics_port, "rpc_requests_total", method="EncodeStream", code=code) == 0


BAD_REQUESTS = {
    "empty batch": (enc.EncodeRequest(), "inputs is empty"),
    "empty string": (enc.EncodeRequest(inputs=texts("ok", "")), "inputs[1].text is empty"),
    "blank string": (enc.EncodeRequest(inputs=texts("   \n")), "inputs[0].text is empty"),
    "empty input": (enc.EncodeRequest(inputs=[pb.Input()]), "inputs[0] is empty"),
    "too many characters": (enc.EncodeRequest(inputs=texts("a" * 50_001)), "limit is 50000"),
    "over token limit, strict": (
        enc.EncodeRequest(inputs=texts("word " * 400), options=pb.EncodeOptions(strict=True)),
        "takes at most 256",
    ),
    "unknown model": (enc.EncodeRequest(model="gpt-17", inputs=texts("a")), "unknown model 'gpt-17'"),
    "image to a text model": (
        enc.EncodeRequest(model="all-MiniLM-L6-v2", inputs=[pb.Input(image=b"\x89PNG")]),
        "does not accept image",
    ),
    "user id to a text worker": (enc.EncodeRequest(inputs=[pb.Input(user_id="u1")]), "accepts user"),
    "batch above the maximum": (enc.EncodeRequest(inputs=texts(*["x"] * 257)), "the limit is 256"),
    "dimensions above the model's": (
        enc.EncodeRequest(inputs=texts("a"), options=pb.EncodeOptions(dimensions=385)),
        "options.dimensions=385",
    ),
    "unknown dtype": (
        enc.EncodeRequest(inputs=texts("a"), options=pb.EncodeOptions(dtype=42)),
        "options.dtype=42",
    ),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_invalid_argument_and_worker_keeps_serving(worker_stub, name: str) -> None:
    request, fragment = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as caught:
        worker_stub.Encode(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()
    assert len(worker_stub.Encode(enc.EncodeRequest(inputs=texts("still serving"))).embeddings) == 1


async def test_with_two_lanes_concurrent_callers_get_their_own_vectors(
    log_dir: Path, text_cache_dir: Path, minilm
) -> None:  # type: ignore[no-untyped-def]
    """TEXT_ONNX_LANES=2: batches run side by side on two sessions; callers that give up mid-way (a
    deadline of 1 ms) do not disturb the others, and the worker answers afterwards."""
    env = {"TEXT_ONNX_LANES": "2", "TEXT_CACHE_DIR": str(text_cache_dir), "TEXT_MAX_BATCH_SIZE": "4"}
    with running(text_worker(env, log_dir)) as worker:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            sentences = [" ".join(["lane"] * (1 + i % 30)) + f" {i}" for i in range(64)]

            async def encode(i: int, sentence: str) -> enc.EncodeResponse | None:
                metadata = (("embeddings-caller", f"caller-{i % 4}"),)
                if i % 5 == 0:
                    with pytest.raises(grpc.aio.AioRpcError) as gave_up:
                        await stub.Encode(
                            enc.EncodeRequest(inputs=texts(sentence)), timeout=0.001, metadata=metadata
                        )
                    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    return None
                return await stub.Encode(
                    enc.EncodeRequest(inputs=texts(sentence)), timeout=60, metadata=metadata
                )

            responses = await asyncio.gather(*(encode(i, s) for i, s in enumerate(sentences)))
            answered = [(s, r) for s, r in zip(sentences, responses, strict=True) if r is not None]
            got = np.stack([vectors(r)[0] for _, r in answered])
            expected = minilm.encode([s for s, _ in answered], convert_to_numpy=True)
            assert len(answered) == 51 and np.all(cosine(got, expected) >= 0.9999)
            after = await stub.Encode(enc.EncodeRequest(inputs=texts("after")), timeout=60)
            assert np.all(cosine(vectors(after), minilm.encode(["after"], convert_to_numpy=True)) >= 0.9999)
