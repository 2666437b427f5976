"""A text query against photos through the running gateway (`make run` first): the label space puts
images in the text model's space, so "a photo of a cat" scores the cat photo highest."""

import io

import grpc
from embeddings.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from PIL import Image
from skimage import data  # CC0 sample photos, bundled with scikit-image


def jpeg(pixels) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


photos = {"cat": jpeg(data.chelsea()), "coffee": jpeg(data.coffee()), "rocket": jpeg(data.rocket())}
with grpc.insecure_channel("localhost:50051") as channel:
    gateway = gateway_pb2_grpc.GatewayStub(channel)
    for query in ("a photo of a cat", "a cup of coffee", "a rocket"):
        response = gateway.Similarity(
            gateway_pb2.SimilarityRequest(
                queries=[types_pb2.Input(text=query)],
                candidates=[types_pb2.Input(image=payload) for payload in photos.values()],
            ),
            timeout=30,
        )
        scores = {name: round(score, 3) for name, score in zip(photos, response.scores, strict=True)}
        print(f"{query!r}: space {response.space}, {response.candidate_model.id}: {scores}")
