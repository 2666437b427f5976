"""Index photos and captions through the running gateway (`make run` first), then search them across
modalities: a text query finds photos, a photo finds captions.

Items persist in the index shards' data directories (data/index-*), so running this again overwrites
the same ids (upserts are idempotent) rather than adding copies."""

import io
import json

import grpc
from embeddings.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from PIL import Image
from skimage import data  # CC0 sample photos, bundled with scikit-image


def jpeg(pixels) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


photos = {name: jpeg(getattr(data, name)()) for name in ("chelsea", "coffee", "rocket", "astronaut", "horse")}
captions = {"cap-cat": "a cat curled up", "cap-coffee": "an espresso in a cup", "cap-launch": "a launch pad"}
IMAGE, TEXT = types_pb2.INPUT_KIND_IMAGE, types_pb2.INPUT_KIND_TEXT

with grpc.insecure_channel("localhost:50051") as channel:
    gateway = gateway_pb2_grpc.GatewayStub(channel)
    items = [
        gateway_pb2.UpsertItem(
            id=name, input=types_pb2.Input(image=image), payload_json=json.dumps({"file": name})
        )
        for name, image in photos.items()
    ] + [
        gateway_pb2.UpsertItem(
            id=key, input=types_pb2.Input(text=text), payload_json=json.dumps({"text": text})
        )
        for key, text in captions.items()
    ]
    # Texts and photos in one request, no space named: the space both kinds share (minilm + label space).
    print(gateway.Upsert(gateway_pb2.UpsertRequest(items=items), timeout=60))

    def show(title: str, request: gateway_pb2.SearchRequest) -> None:
        response = gateway.Search(request, timeout=30)
        hits = [(hit.id, round(hit.score, 3)) for hit in response.hits]
        print(f"{title}: space {response.space}, partial={response.partial}: {hits}")

    show(
        "text -> photos",
        gateway_pb2.SearchRequest(
            input=types_pb2.Input(text="a kitten"), k=3, filter=types_pb2.SearchFilter(kinds=[IMAGE])
        ),
    )
    show(
        "photo -> captions",
        gateway_pb2.SearchRequest(
            input=types_pb2.Input(image=photos["coffee"]),
            space="minilm",
            k=2,
            filter=types_pb2.SearchFilter(kinds=[TEXT]),
        ),
    )
