"""Bad input against every service, with real processes: one table of malformed and hostile requests (empty,
oversized, wrong types, corrupt images, bombs, NaN vectors, unknown ids, models and spaces, huge k, invalid
UTF-8, truncated messages and streams, cancelled calls), each sent to the gateway or straight to a text
worker, an image worker, an index shard or the user-item worker, and each checked against the status code
(and the words of the message) that README's "Bad input and status codes" table documents. After each
case the service it hit answers a valid request; the last test checks every process is still up and
answering.

The session's text and image workers serve the models; this module starts two index shards, a user-item
worker (fitted with a small synthetic dataset) and a gateway wired to all of them."""

import io
import signal
import struct
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import grpc
import numpy as np
import pytest
from embeddings.v1 import content_pb2 as cpb
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc, gateway_pb2_grpc, index_pb2_grpc, recommender_pb2_grpc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb
from google.protobuf.message import Message
from PIL import Image

from harness.processes import RedisServer, Service, gateway, index_shard, useritem_worker
from services.common.vectors import to_wire
from tests import image_files, system
from tests.clip_checkpoint import TinyClip

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
CANCELLED = grpc.StatusCode.CANCELLED
OK = grpc.StatusCode.OK

MINILM = "all-MiniLM-L6-v2"
MINILM_DIM = 384
IMAGE_MODEL = "efficientnet-lite0"
SESSION_MAX_IMAGE_BYTES = 2_000_000  # IMAGE_MAX_IMAGE_BYTES of the session's image worker (conftest.py)
SHARD_A_MAX_MESSAGE_BYTES = 1 << 20  # INDEX_MAX_MESSAGE_BYTES of shard a (b keeps the default)
GATEWAY_MAX_MESSAGE_BYTES = 8 << 20  # GATEWAY_MAX_MESSAGE_BYTES of this module's gateway
PROBE_SPACE, PROBE_DIM = "probe", 8  # a space upserted straight into each shard
OWN_SPACE, OWN_DIM = "own8", 8  # a bring-your-own-vectors space upserted through the gateway

# The user-item worker: a small explicit-rating model "mf" (the gateway's default user-item model). The
# worker's own default model is another one that is never trained, so a call that names no model gets
# FAILED_PRECONDITION ("call Fit first").
MODEL, UNTRAINED = "mf", "untrained"
USERS, ITEMS, PER_USER = 12, 10, 6
USERITEM_ENV = {**system.USERITEM_ENV, "USERITEM_DEFAULT_MODEL": UNTRAINED}
SHARD_ENV = system.SHARD_ENV
GATEWAY_ENV = {**system.GATEWAY_ENV, "GATEWAY_MAX_MESSAGE_BYTES": str(GATEWAY_MAX_MESSAGE_BYTES)}
CAPTIONS = {"cap-cat": "a cat on a mat", "cap-coffee": "a cup of coffee", "cap-rocket": "a rocket launch"}


def ratings() -> list[tuple[str, str, float]]:
    """USERS x PER_USER explicit ratings (1..5, seeded); user u rates items u, u+1, ... (mod ITEMS), so
    every item is rated and every user has ITEMS - PER_USER unseen items."""
    rng = np.random.default_rng(3)
    return [
        (f"u{user}", f"i{(user + step) % ITEMS}", float(rng.integers(1, 6)))
        for user in range(USERS)
        for step in range(PER_USER)
    ]


def interactions(rows: list[tuple[str, str, float]]) -> list[rec.Interaction]:
    return [rec.Interaction(user_id=user, item_id=item, rating=rating) for user, item, rating in rows]


# --- the processes ----------------------------------------------------------------------------------------


@dataclass
class Cluster:
    text: Service
    image: Service
    shards: dict[str, Service]  # "shard-a", "shard-b"
    useritem: Service
    gateway: Service
    plain_gateway: Service  # the session's gateway: no shards, no user-item worker
    useritem_dir: Path
    clip_space: str
    channels: dict[str, grpc.Channel]
    version: str = ""  # of MODEL, fitted by the fixture
    fitted_files: frozenset[str] = frozenset()  # the user-item data directory after that Fit

    def service(self, target: str) -> Service:
        return {
            "gateway": self.gateway,
            "plain-gateway": self.plain_gateway,
            "text": self.text,
            "image": self.image,
            "useritem": self.useritem,
            **self.shards,
        }[target]

    def channel(self, target: str) -> grpc.Channel:
        if target not in self.channels:
            self.channels[target] = grpc.insecure_channel(self.service(target).address)
        return self.channels[target]

    def models_on_disk(self) -> frozenset[str]:
        """Every file and folder under the user-item worker's data directory (versions, temporaries)."""
        return frozenset(str(path.relative_to(self.useritem_dir)) for path in self.useritem_dir.rglob("*"))


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    log_dir: Path,
    redis_server: RedisServer,
    text_service: Service,
    image_service: Service,
    gateway_service: Service,
    tiny_clip: TinyClip,
) -> Iterator[Cluster]:
    shards = {
        "shard-a": index_shard(
            tmp_path_factory.mktemp("bad-input-shard-a"),
            {**SHARD_ENV, "INDEX_MAX_MESSAGE_BYTES": str(SHARD_A_MAX_MESSAGE_BYTES)},
            log_dir,
            name="bad-input-shard-a",
        ),
        "shard-b": index_shard(
            tmp_path_factory.mktemp("bad-input-shard-b"), SHARD_ENV, log_dir, name="bad-input-shard-b"
        ),
    }
    useritem_dir = tmp_path_factory.mktemp("bad-input-useritem")
    fit_dir = tmp_path_factory.mktemp("bad-input-fit")  # empty: Fit from a file finds nothing here
    worker = useritem_worker(useritem_dir, USERITEM_ENV, log_dir, fit_dir=fit_dir)
    worker.name = "bad-input-useritem"
    front = gateway(
        [text_service.address, image_service.address],
        redis_server.url,
        GATEWAY_ENV,
        log_dir,
        shards=[shard.address for shard in shards.values()],
        useritem=worker.address,
    )
    front.name = "bad-input-gateway"
    started: list[Service] = []
    channels: dict[str, grpc.Channel] = {}
    try:
        for backend in [*shards.values(), worker]:  # in parallel: each loads on its own
            backend.start()
            started.append(backend)
        for backend in started:
            backend.wait_serving()
        front.start()  # after its backends: it would otherwise start in reconnect back-off
        started.append(front)
        front.wait_serving()
        cluster = Cluster(
            text_service,
            image_service,
            shards,
            worker,
            front,
            gateway_service,
            useritem_dir,
            tiny_clip.space,
            channels,
        )
        cluster.version = prepare(cluster)
        cluster.fitted_files = cluster.models_on_disk()
        yield cluster
    finally:
        for channel in channels.values():
            channel.close()
        for process in reversed(started):
            process.signal(signal.SIGTERM)
        for process in reversed(started):
            process.stop()


def prepare(cluster: Cluster) -> str:
    """Fit MODEL through the gateway, index captions and an own-vector space through it, and a probe space
    straight into each shard; the fitted version."""
    stub = gateway_pb2_grpc.GatewayStub(cluster.channel("gateway"))
    progress = list(
        stub.Fit(iter([rec.FitRequest(model=MODEL, interactions=interactions(ratings()))]), timeout=60)
    )
    assert progress and progress[-1].done, progress
    items = [gw.UpsertItem(id=key, input=pb.Input(text=text)) for key, text in CAPTIONS.items()]
    assert stub.Upsert(gw.UpsertRequest(items=items), timeout=30).upserted == len(items)
    own = [gw.UpsertItem(id=f"own-{n}", vector=to_wire(unit(OWN_DIM, n))) for n in range(4)]
    assert stub.Upsert(gw.UpsertRequest(space=OWN_SPACE, items=own), timeout=30).upserted == len(own)
    for name in cluster.shards:
        probes = [idx.IndexItem(id=f"{name}-probe-{n}", vector=to_wire(unit(PROBE_DIM, n))) for n in range(3)]
        index = index_pb2_grpc.IndexStub(cluster.channel(name))
        assert index.Upsert(idx.IndexUpsertRequest(space=PROBE_SPACE, items=probes), timeout=10).upserted == 3
    return str(progress[-1].model.version)


# --- valid requests: every service still answers -------------------------------------------------------------


def answers(cluster: Cluster, target: str, timeout: float = 30) -> None:
    """A valid request to `target` succeeds (and its process is running)."""
    assert cluster.service(target).running(), f"{target} exited:\n{cluster.service(target).log_tail()}"
    channel = cluster.channel(target)
    if target in ("text", "image", "plain-gateway"):
        inputs = (
            [pb.Input(image=image_files.one_pixel())] if target == "image" else [pb.Input(text="still here")]
        )
        encoder = (
            gateway_pb2_grpc.GatewayStub(channel)
            if target == "plain-gateway"
            else encoder_pb2_grpc.EncoderStub(channel)
        )
        response = encoder.Encode(enc.EncodeRequest(inputs=inputs), timeout=timeout)
        assert len(response.embeddings) == 1 and response.embeddings[0].vector.dim > 0
    elif target.startswith("shard-"):
        index = index_pb2_grpc.IndexStub(channel)
        found = index.Search(
            idx.IndexSearchRequest(space=PROBE_SPACE, query=to_wire(unit(PROBE_DIM, 0)), k=1), timeout=timeout
        )
        assert found.hits and found.hits[0].id == f"{target}-probe-0" and found.hits[0].score > 0.999
    elif target == "useritem":
        recommender = recommender_pb2_grpc.RecommenderStub(channel)
        response = recommender.Recommend(
            rec.RecommendRequest(model=MODEL, user_id="u0", k=3), timeout=timeout
        )
        assert len(response.items) == 3 and response.model.version == cluster.version
    else:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        hits = stub.Search(gw.SearchRequest(input=pb.Input(text="a kitten"), k=1), timeout=timeout).hits
        assert [hit.id for hit in hits] == ["cap-cat"], hits
        response = stub.Recommend(rec.RecommendRequest(model=MODEL, user_id="u1", k=2), timeout=timeout)
        assert len(response.items) == 2 and response.model.version == cluster.version


# --- building bad requests ---------------------------------------------------------------------------------

Request: TypeAlias = Message | bytes
Build: TypeAlias = Callable[[Cluster], Request | list[Request]]


def unit(dim: int, seed: int) -> np.ndarray:
    row = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return row / np.linalg.norm(row)


def with_value(value: float, dim: int = MINILM_DIM) -> pb.Vector:
    row = unit(dim, 5)
    row[3] = value
    return to_wire(row)


def texts(*values: str) -> list[pb.Input]:
    return [pb.Input(text=value) for value in values]


def images(*payloads: bytes) -> list[pb.Input]:
    return [pb.Input(image=payload) for payload in payloads]


def invalid_utf8(message: Message, placeholder: str) -> bytes:
    """`message` serialized, with the string `placeholder` (once in it) replaced by as many bytes that are
    not UTF-8: the framing stays valid, only the string is not."""
    data = message.SerializeToString()
    marker = placeholder.encode()
    assert data.count(marker) == 1, placeholder
    return data.replace(marker, (b"\xff\xfe" * len(marker))[: len(marker)])


def truncated(message: Message, cut: int = 6) -> bytes:
    """`message` serialized, its last `cut` bytes missing (a length-delimited field then overruns)."""
    return message.SerializeToString()[:-cut]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit RGB) over a few bytes of pixel data: a bomb that costs
    nothing to build, caught from the header alone."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(bytes(64)))
        + _png_chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    data = image_files.photo("coffee", "PNG", size=(64, 48))
    return data[: len(data) // 2]


def tiff() -> bytes:
    """A valid TIFF: a format the workers do not accept."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, format="TIFF")
    return buffer.getvalue()


def noise_jpegs(count: int, side: int = 96) -> list[bytes]:
    """`count` distinct random JPEGs (unseeded: never in the gateway's cache): seconds of model time in bulk,
    one model batch (32) about one (a cancelled request's queued batches are dropped)."""
    rng = np.random.default_rng()
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


def long_texts(count: int) -> list[pb.Input]:
    """`count` distinct texts of about 100 tokens: 256 of them take the text worker seconds, one model
    batch (32) about one (a cancelled request's queued batches are dropped)."""
    words = "the quick brown fox jumps over a lazy dog while seven bright stars fade slowly".split()
    return [
        pb.Input(text=f"{n} " + " ".join(words[(n + w) % len(words)] for w in range(100)))
        for n in range(count)
    ]


def fit_rows() -> list[rec.FitRequest]:
    """A valid Fit stream (of MODEL), in two messages."""
    rows = interactions(ratings())
    return [rec.FitRequest(model=MODEL, interactions=rows[:40]), rec.FitRequest(interactions=rows[40:])]


# --- checks after a case --------------------------------------------------------------------------------------


def nothing_fitted(cluster: Cluster) -> None:
    """A refused or cancelled Fit wrote nothing (no version, no temporary) and MODEL serves its version."""
    assert cluster.models_on_disk() == cluster.fitted_files, cluster.models_on_disk() ^ cluster.fitted_files
    recommender = recommender_pb2_grpc.RecommenderStub(cluster.channel("useritem"))
    response = recommender.Recommend(rec.RecommendRequest(model=MODEL, user_id="u2", k=1), timeout=10)
    assert response.model.version == cluster.version
    with pytest.raises(grpc.RpcError) as caught:  # the default model was not trained by the refused Fit
        recommender.Recommend(rec.RecommendRequest(user_id="u2", k=1), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


INDEX_STREAM_WINDOW = 4  # the shards' INDEX_STREAM_WINDOW (default): requests of one UpsertStream at once


def stream_upserts(prefix: str, count: int, seed: int) -> list[Request]:
    """`count` one-item upserts into the probe space, item f"{prefix}-{n}" with vector seed `seed` + n."""
    return [
        idx.IndexUpsertRequest(
            space=PROBE_SPACE,
            items=[idx.IndexItem(id=f"{prefix}-{n}", vector=to_wire(unit(PROBE_DIM, seed + n)))],
        )
        for n in range(count)
    ]


def acknowledged_item_kept(cluster: Cluster) -> None:
    """The request a cancelled UpsertStream had acknowledged (the first) is stored on shard b."""
    index = index_pb2_grpc.IndexStub(cluster.channel("shard-b"))
    found = index.Search(
        idx.IndexSearchRequest(space=PROBE_SPACE, query=to_wire(unit(PROBE_DIM, 70)), k=1), timeout=10
    )
    assert found.hits and found.hits[0].id == "acked-0" and found.hits[0].score > 0.999


def not_stored(item_id: str, space: str, dim: int, seed: int) -> Callable[[Cluster], None]:
    def check(cluster: Cluster) -> None:
        stub = gateway_pb2_grpc.GatewayStub(cluster.channel("gateway"))
        hits = stub.Search(
            gw.SearchRequest(vector=to_wire(unit(dim, seed)), space=space, k=10), timeout=10
        ).hits
        assert item_id not in [hit.id for hit in hits]

    return check


# --- the table ---------------------------------------------------------------------------------------------------

STREAMING = {
    "Gateway/EncodeStream",
    "Gateway/UpsertStream",
    "Gateway/Fit",
    "Encoder/EncodeStream",
    "Index/UpsertStream",
    "Recommender/Fit",
}


@dataclass(frozen=True)
class Case:
    """One bad request: `target` (a service of the cluster), `method` ("Service/Method" of embeddings.v1),
    the request (a message, raw bytes, or for streaming methods a list of them), the status it must get and
    phrases its message must contain."""

    name: str
    target: str
    method: str
    build: Build
    code: grpc.StatusCode
    fragments: tuple[str, ...] = ()
    # Cancel the call this long after starting it (after reading `read_first` responses of a stream); a
    # streamed request then stops sending after its messages without ending the stream.
    cancel_after_s: float | None = None
    read_first: int = 0
    then: Callable[[Cluster], None] | None = None  # a further check (say, that nothing was written)
    timeout_s: float = 30.0  # the client's deadline


def case(
    name: str,
    target: str,
    method: str,
    build: Build,
    code: grpc.StatusCode,
    *fragments: str,
    **options: object,
) -> Case:
    return Case(name, target, method, build, code, fragments, **options)  # type: ignore[arg-type]


CASES: list[Case] = [
    # --- empty ----------------------------------------------------------------------------------------------
    case(
        "gateway: Encode of no inputs",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(),
        INVALID,
        "inputs is empty",
    ),
    case(
        "gateway: blank text at the caller's index 2",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(inputs=texts("a cat on a mat", "a cup of tea", " \t\n")),
        INVALID,
        "inputs[2].text is empty",
    ),
    case(
        "gateway: Upsert with blank text at the caller's items[3], after vector and text items",
        "gateway",
        "Gateway/Upsert",
        lambda c: gw.UpsertRequest(
            space="minilm",
            items=[
                gw.UpsertItem(id="remap-0", vector=to_wire(unit(MINILM_DIM, 1))),
                gw.UpsertItem(id="remap-1", input=pb.Input(text="a kettle on a stove")),
                gw.UpsertItem(id="remap-2", vector=to_wire(unit(MINILM_DIM, 2))),
                gw.UpsertItem(id="remap-3", input=pb.Input(text="  ")),
            ],
        ),
        INVALID,
        "items[3].text is empty",
    ),
    case(
        "gateway: Similarity with a blank candidate at the caller's index 2",
        "gateway",
        "Gateway/Similarity",
        lambda c: gw.SimilarityRequest(queries=texts("a cat"), candidates=texts("a dog", "a bird", "\n")),
        INVALID,
        "candidates[2].text is empty",
    ),
    case(
        "text: empty text",
        "text",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=texts("ok", "")),
        INVALID,
        "inputs[1].text is empty",
    ),
    case(
        "image: empty Input",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=[pb.Input()]),
        INVALID,
        "inputs[0] is empty",
    ),
    case(
        "image: zero-byte image",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=images(b"")),
        INVALID,
        "inputs[0].image is empty (0 bytes)",
    ),
    case(
        "gateway: Upsert of no items",
        "gateway",
        "Gateway/Upsert",
        lambda c: gw.UpsertRequest(space=OWN_SPACE),
        INVALID,
        "items is empty",
    ),
    case(
        "gateway: Search with no query",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(space="minilm", k=3),
        INVALID,
        "the query is empty",
    ),
    case(
        "gateway: Delete naming no space",
        "gateway",
        "Gateway/Delete",
        lambda c: gw.DeleteRequest(ids=["own-0"]),
        INVALID,
        "space is empty",
    ),
    case(
        "shard: Upsert of an empty id",
        "shard-a",
        "Index/Upsert",
        lambda c: idx.IndexUpsertRequest(
            space=PROBE_SPACE, items=[idx.IndexItem(id="", vector=to_wire(unit(PROBE_DIM, 9)))]
        ),
        INVALID,
        "items[0].id is empty",
    ),
    case(
        "shard: Search naming no space",
        "shard-b",
        "Index/Search",
        lambda c: idx.IndexSearchRequest(query=to_wire(unit(PROBE_DIM, 1)), k=1),
        INVALID,
        "space is empty",
    ),
    case(
        "useritem: Recommend of an empty user_id",
        "useritem",
        "Recommender/Recommend",
        lambda c: rec.RecommendRequest(model=MODEL, k=3),
        INVALID,
        "user_id is empty",
    ),
    case(
        "useritem: Fit of an empty stream",
        "useritem",
        "Recommender/Fit",
        lambda c: [],
        INVALID,
        "no messages",
        then=nothing_fitted,
    ),
    case(
        "useritem: Fit with an empty user_id",
        "useritem",
        "Recommender/Fit",
        lambda c: [
            rec.FitRequest(
                model=MODEL,
                interactions=[*interactions(ratings()[:2]), rec.Interaction(item_id="i1", rating=3)],
            )
        ],
        INVALID,
        "interactions[2].user_id is empty",
        then=nothing_fitted,
    ),
    # --- oversized ------------------------------------------------------------------------------------------
    case(
        "gateway: 257 inputs",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(inputs=texts(*[f"t{n}" for n in range(257)])),
        INVALID,
        "257",
        "the limit is 256",
    ),
    case(
        "text: 257 inputs",
        "text",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=texts(*[f"t{n}" for n in range(257)])),
        INVALID,
        "257",
        "the limit is 256",
    ),
    case(
        "image: 257 inputs",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=images(*[image_files.one_pixel()] * 257)),
        INVALID,
        "257",
        "the limit is 256",
    ),
    case(
        "text: text over TEXT_MAX_TEXT_CHARS",
        "text",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=texts("a" * 50_001)),
        INVALID,
        "50001 characters",
        "the limit is 50000",
    ),
    case(
        "text: over the token limit with strict",
        "text",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=texts("word " * 400), options=pb.EncodeOptions(strict=True)),
        INVALID,
        "tokens",
        "at most 256",
    ),
    case(
        "image: image over IMAGE_MAX_IMAGE_BYTES",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=images(image_files.larger_than(SESSION_MAX_IMAGE_BYTES))),
        INVALID,
        "inputs[0].image",
        f"the limit is {SESSION_MAX_IMAGE_BYTES}",
    ),
    case(
        "gateway: message over GATEWAY_MAX_MESSAGE_BYTES",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(inputs=images(bytes(GATEWAY_MAX_MESSAGE_BYTES + 1000))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    case(
        "shard: message over INDEX_MAX_MESSAGE_BYTES",
        "shard-a",
        "Index/Upsert",
        lambda c: idx.IndexUpsertRequest(
            space="huge", items=[idx.IndexItem(id="huge", vector=to_wire(np.ones(300_000, dtype=np.float32)))]
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    case(
        "shard: 1025 items",
        "shard-b",
        "Index/Upsert",
        lambda c: idx.IndexUpsertRequest(
            space=PROBE_SPACE,
            items=[idx.IndexItem(id=f"many-{n}", vector=to_wire(unit(PROBE_DIM, n))) for n in range(1025)],
        ),
        INVALID,
        "1025",
        "the limit is 1024",
    ),
    case(
        "gateway: id over GATEWAY_MAX_ID_BYTES",
        "gateway",
        "Gateway/Upsert",
        lambda c: gw.UpsertRequest(
            space=OWN_SPACE, items=[gw.UpsertItem(id="x" * 513, vector=to_wire(unit(OWN_DIM, 1)))]
        ),
        INVALID,
        "items[0].id",
        "512",
    ),
    case(
        "shard: payload over INDEX_MAX_PAYLOAD_BYTES",
        "shard-b",
        "Index/Upsert",
        lambda c: idx.IndexUpsertRequest(
            space=PROBE_SPACE,
            items=[
                idx.IndexItem(
                    id="fat", vector=to_wire(unit(PROBE_DIM, 1)), payload_json='{"x": "' + "y" * 16_400 + '"}'
                )
            ],
        ),
        INVALID,
        "items[0].payload_json",
        "the limit is 16384",
    ),
    case(
        "useritem: FoldIn of 1025 interactions",
        "useritem",
        "Recommender/FoldIn",
        lambda c: rec.FoldInRequest(
            model=MODEL, interactions=[rec.Interaction(item_id="i1", rating=3)] * 1025
        ),
        INVALID,
        "1 to 1024 interactions",
        "got 1025",
    ),
    # --- wrong types ----------------------------------------------------------------------------------------
    case(
        "text: an image to the text model",
        "text",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(model=MINILM, inputs=images(image_files.one_pixel())),
        INVALID,
        "does not accept image",
        "accepts text",
    ),
    case(
        "image: text to an image model",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(model=IMAGE_MODEL, inputs=texts("a cat")),
        INVALID,
        "does not accept text",
    ),
    case(
        "gateway: a user id to the text model",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(model=MINILM, inputs=[pb.Input(user_id="u0")]),
        INVALID,
        "does not accept user",
        "accepts text",
    ),
    case(
        "useritem: text to the user-item model",
        "useritem",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(model=MODEL, inputs=texts("a cat")),
        INVALID,
        "inputs[0] is text",
        "accepts user_id and item_id",
    ),
    case(
        "gateway: Search by a vector of the wrong dimension",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(vector=to_wire(unit(10, 1)), space="minilm", k=3),
        INVALID,
        "10 dimensions",
        "384-dimensional",
    ),
    # --- fused and hybrid searches ----------------------------------------------------------------------------
    case(
        "gateway: fused Search over spaces none of which hold items (user ids: only useritem-mf)",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(input=pb.Input(user_id="u0"), k=3, all_spaces=True),
        grpc.StatusCode.FAILED_PRECONDITION,
        "none of the spaces where user inputs have a model (useritem-mf) holds any item",
    ),
    case(
        "gateway: fused Search of a kind no model takes (item ids, on a gateway without a user-item worker)",
        "plain-gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(input=pb.Input(item_id="i1"), k=3, all_spaces=True),
        INVALID,
        "a model for item inputs is not served here",
    ),
    case(
        "gateway: fused Search naming a space too",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(input=pb.Input(text="a cat"), space="minilm", k=3, all_spaces=True),
        INVALID,
        "leave `space` and `model` empty",
    ),
    case(
        "gateway: fused Search by a vector",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(vector=to_wire(unit(MINILM_DIM, 1)), k=3, all_spaces=True),
        INVALID,
        "all_spaces needs `input`",
    ),
    case(
        "gateway: HybridSearch for an unknown user",
        "gateway",
        "Gateway/HybridSearch",
        lambda c: gw.HybridSearchRequest(
            input=pb.Input(text="a cat"), user_id="nobody", useritem_model=MODEL, k=3
        ),
        NOT_FOUND,
        "user_id 'nobody' is not a user of model 'mf'",
    ),
    case(
        "gateway: HybridSearch naming an unknown user-item model",
        "gateway",
        "Gateway/HybridSearch",
        lambda c: gw.HybridSearchRequest(
            input=pb.Input(text="a cat"), user_id="u1", useritem_model="nope", k=3
        ),
        INVALID,
        "model 'nope' is not served here",
    ),
    case(
        "gateway: HybridSearch naming a text model as the user-item model",
        "gateway",
        "Gateway/HybridSearch",
        lambda c: gw.HybridSearchRequest(
            input=pb.Input(text="a cat"), user_id="u1", useritem_model=MINILM, k=3
        ),
        INVALID,
        "does not accept user inputs",
    ),
    case(
        "gateway: HybridSearch with a weight over 1",
        "gateway",
        "Gateway/HybridSearch",
        lambda c: gw.HybridSearchRequest(
            input=pb.Input(text="a cat"), user_id="u1", useritem_model=MODEL, k=3, user_weight=1.5
        ),
        INVALID,
        "user_weight is 1.5; it must be in [0, 1]",
    ),
    case(
        "gateway: HybridSearch with a NaN weight",
        "gateway",
        "Gateway/HybridSearch",
        lambda c: gw.HybridSearchRequest(
            input=pb.Input(text="a cat"), user_id="u1", useritem_model=MODEL, k=3, user_weight=float("nan")
        ),
        INVALID,
        "user_weight is nan",
    ),
    case(
        "gateway: HybridSearch with fewer candidates than k",
        "gateway",
        "Gateway/HybridSearch",
        lambda c: gw.HybridSearchRequest(
            input=pb.Input(text="a cat"), user_id="u1", useritem_model=MODEL, k=5, candidates=2
        ),
        INVALID,
        "candidates is 2; it must be at least k (5)",
    ),
    case(
        "gateway: HybridSearch with no user",
        "gateway",
        "Gateway/HybridSearch",
        lambda c: gw.HybridSearchRequest(input=pb.Input(text="a cat"), k=3),
        INVALID,
        "user_id is empty",
    ),
    case(
        "shard: Upsert of a vector of the wrong dimension",
        "shard-a",
        "Index/Upsert",
        lambda c: idx.IndexUpsertRequest(
            space=PROBE_SPACE, items=[idx.IndexItem(id="five", vector=to_wire(unit(5, 1)))]
        ),
        INVALID,
        "items[0].vector has 5 dimensions",
        f"{PROBE_DIM}-dimensional",
    ),
    case(
        "shard: vector data length not matching dim",
        "shard-b",
        "Index/Upsert",
        lambda c: idx.IndexUpsertRequest(
            space=PROBE_SPACE,
            items=[idx.IndexItem(id="short", vector=pb.Vector(data=bytes(12), dim=PROBE_DIM))],
        ),
        INVALID,
        "items[0].vector.data has 12 bytes",
        "needs 32",
    ),
    case(
        "text: dimensions above the model's",
        "text",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=texts("a"), options=pb.EncodeOptions(dimensions=385)),
        INVALID,
        "options.dimensions=385",
        "1..384",
    ),
    case(
        "gateway: unknown dtype",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(inputs=texts("a"), options=pb.EncodeOptions(dtype=42)),
        INVALID,
        "options.dtype=42",
    ),
    case(
        "gateway: Similarity PAIRWISE of unequal lengths",
        "gateway",
        "Gateway/Similarity",
        lambda c: gw.SimilarityRequest(
            queries=texts("a", "b"), candidates=texts("c"), mode=gw.SIMILARITY_MODE_PAIRWISE
        ),
        INVALID,
        "2 queries",
        "1 candidates",
    ),
    case(
        "gateway: Similarity of models of different spaces",
        "gateway",
        "Gateway/Similarity",
        lambda c: gw.SimilarityRequest(
            queries=texts("a cat"),
            candidates=images(image_files.one_pixel()),
            query_model=MINILM,
            candidate_model=IMAGE_MODEL,
        ),
        INVALID,
        "'minilm'",
        "'efficientnet-lite0'",
    ),
    case(
        "shard: filter of an unknown kind",
        "shard-a",
        "Index/Search",
        lambda c: idx.IndexSearchRequest(
            space=PROBE_SPACE,
            query=to_wire(unit(PROBE_DIM, 1)),
            k=1,
            filter=pb.SearchFilter(kinds=[99]),
        ),
        INVALID,
        "filter.kinds",
        "[99]",
    ),
    case(
        "text: the bytes of a FitProgress",
        "text",
        "Encoder/Encode",
        lambda c: rec.FitProgress(epoch=3, epochs=5, train_loss=0.5, done=True).SerializeToString(),
        INVALID,
        "inputs is empty",
    ),
    case(
        "shard: the bytes of a gateway UpsertRequest",
        "shard-b",
        "Index/Upsert",
        lambda c: gw.UpsertRequest(
            space=PROBE_SPACE, items=[gw.UpsertItem(id="x", input=pb.Input(image=image_files.one_pixel()))]
        ).SerializeToString(),
        INVALID,
        "not a valid protobuf message",
    ),
    # --- corrupt images ---------------------------------------------------------------------------------------
    case(
        "image: random bytes",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=images(np.random.default_rng(4).bytes(3000))),
        INVALID,
        "inputs[0].image",
        "not a readable image",
    ),
    case(
        "image: truncated JPEG",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=images(image_files.one_pixel(), image_files.truncated_jpeg())),
        INVALID,
        "inputs[1].image",
        "truncated or corrupt",
    ),
    case(
        "gateway: truncated PNG at the caller's index 1",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(inputs=images(image_files.one_pixel(), truncated_png())),
        INVALID,
        "inputs[1].image",
    ),
    case(
        "image: a TIFF file",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=images(tiff())),
        INVALID,
        "inputs[0].image",
        "not a readable image",
    ),
    # --- bombs --------------------------------------------------------------------------------------------------
    case(
        "image: PNG header claiming 100000x100000",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=images(png_claiming(100_000, 100_000))),
        INVALID,
        "inputs[0].image",
        "100000x100000",
        "IMAGE_MAX_IMAGE_PIXELS",
    ),
    case(
        "gateway: deflate bomb, 20000x20000 in a few KB",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(inputs=images(image_files.bomb_png())),
        INVALID,
        "inputs[0].image",
        "20000x20000",
        "IMAGE_MAX_IMAGE_PIXELS",
    ),
    case(
        "image: 20000x10 strip",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=images(image_files.strip())),
        INVALID,
        "20000x10",
        "IMAGE_MAX_ASPECT_RATIO",
    ),
    # --- NaN, infinite and zero vectors ---------------------------------------------------------------------
    case(
        "gateway: Search by a NaN vector",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(vector=with_value(float("nan")), space="minilm", k=3),
        INVALID,
        "vector holds NaN or infinite values",
    ),
    case(
        "gateway: Search by a zero vector",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(
            vector=to_wire(np.zeros(MINILM_DIM, dtype=np.float32)), space="minilm", k=3
        ),
        INVALID,
        "all zeros",
    ),
    case(
        "gateway: Upsert of an infinite vector",
        "gateway",
        "Gateway/Upsert",
        lambda c: gw.UpsertRequest(
            space=OWN_SPACE,
            items=[
                gw.UpsertItem(id="fine", vector=to_wire(unit(OWN_DIM, 50))),
                gw.UpsertItem(id="inf", vector=with_value(float("inf"), OWN_DIM)),
            ],
        ),
        INVALID,
        "items[1].vector",
        "NaN or infinite",
        then=not_stored("fine", OWN_SPACE, OWN_DIM, 50),
    ),
    case(
        "shard: Upsert of a zero vector",
        "shard-a",
        "Index/Upsert",
        lambda c: idx.IndexUpsertRequest(
            space=PROBE_SPACE,
            items=[idx.IndexItem(id="zero", vector=to_wire(np.zeros(PROBE_DIM, dtype=np.float32)))],
        ),
        INVALID,
        "items[0].vector is all zeros",
    ),
    case(
        "shard: Search by a NaN query",
        "shard-b",
        "Index/Search",
        lambda c: idx.IndexSearchRequest(space=PROBE_SPACE, query=with_value(float("nan"), PROBE_DIM), k=1),
        INVALID,
        "query holds NaN or infinite values",
    ),
    case(
        "useritem: FoldIn with a NaN rating",
        "useritem",
        "Recommender/FoldIn",
        lambda c: rec.FoldInRequest(
            model=MODEL, interactions=[rec.Interaction(item_id="i1", rating=float("nan"))]
        ),
        INVALID,
        "interactions[0].rating",
        "nan",
    ),
    case(
        "gateway: Fit with an infinite rating",
        "gateway",
        "Gateway/Fit",
        lambda c: [
            rec.FitRequest(
                model=MODEL,
                interactions=[
                    *interactions(ratings()[:3]),
                    rec.Interaction(user_id="u1", item_id="i1", rating=float("inf")),
                ],
            )
        ],
        INVALID,
        "interactions[3].rating",
        "inf",
        then=nothing_fitted,
    ),
    # --- unknown ids ----------------------------------------------------------------------------------------
    case(
        "useritem: Recommend for an unknown user",
        "useritem",
        "Recommender/Recommend",
        lambda c: rec.RecommendRequest(model=MODEL, user_id="nobody", k=3),
        NOT_FOUND,
        "user_id 'nobody'",
        "version",
    ),
    case(
        "gateway: Recommend for an unknown user",
        "gateway",
        "Gateway/Recommend",
        lambda c: rec.RecommendRequest(model=MODEL, user_id="nobody", k=3),
        NOT_FOUND,
        "user_id 'nobody'",
        "version",
    ),
    case(
        "gateway: SimilarItems of an unknown item",
        "gateway",
        "Gateway/SimilarItems",
        lambda c: rec.SimilarItemsRequest(model=MODEL, item_id="ghost", k=3),
        NOT_FOUND,
        "item_id 'ghost'",
        "version",
    ),
    case(
        "gateway: FoldIn with unknown items",
        "gateway",
        "Gateway/FoldIn",
        lambda c: rec.FoldInRequest(
            model=MODEL,
            k=3,
            interactions=[
                rec.Interaction(item_id="i1", rating=4),
                rec.Interaction(item_id="ghost-1", rating=3),
                rec.Interaction(item_id="ghost-2", rating=5),
            ],
        ),
        NOT_FOUND,
        "'ghost-1'",
        "'ghost-2'",
        "version",
    ),
    case(
        "useritem: Encode of an unknown user id",
        "useritem",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(model=MODEL, inputs=[pb.Input(user_id="u1"), pb.Input(user_id="nobody")]),
        NOT_FOUND,
        "inputs[1].user_id 'nobody'",
        "version",
    ),
    case(
        "gateway: Encode of an unknown item id",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(model=MODEL, inputs=[pb.Input(item_id="ghost")]),
        NOT_FOUND,
        "'ghost'",
        "version",
    ),
    # --- unknown models and spaces --------------------------------------------------------------------------
    case(
        "gateway: unknown model",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(model="gpt-17", inputs=texts("a")),
        INVALID,
        "'gpt-17'",
        MINILM,
    ),
    case(
        "text: unknown model",
        "text",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(model="gpt-17", inputs=texts("a")),
        INVALID,
        "unknown model 'gpt-17'",
        MINILM,
    ),
    case(
        "useritem: Recommend of an unknown model",
        "useritem",
        "Recommender/Recommend",
        lambda c: rec.RecommendRequest(model="nope", user_id="u0", k=3),
        INVALID,
        "unknown model 'nope'",
        MODEL,
    ),
    case(
        "gateway: Search of an unknown space",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(vector=to_wire(unit(8, 1)), space="nowhere", k=3),
        INVALID,
        "'nowhere' is unknown",
        "minilm",
    ),
    case(
        "gateway: Upsert of text into a space no model writes",
        "gateway",
        "Gateway/Upsert",
        lambda c: gw.UpsertRequest(
            space="nowhere", items=[gw.UpsertItem(id="lost", input=pb.Input(text="a cat"))]
        ),
        INVALID,
        "'nowhere'",
    ),
    case(
        "gateway: Fit of an invalid model name",
        "gateway",
        "Gateway/Fit",
        lambda c: [rec.FitRequest(model="../x", interactions=interactions(ratings()))],
        INVALID,
        "model name '../x' is not valid",
        then=nothing_fitted,
    ),
    case(
        "gateway: Fit from a path outside USERITEM_FIT_DIR",
        "gateway",
        "Gateway/Fit",
        lambda c: [rec.FitRequest(model=MODEL, path="../../../../etc/passwd")],
        INVALID,
        "'../../../../etc/passwd'",
        "outside the worker's fit directory",
        then=nothing_fitted,
    ),
    case(
        "useritem: Fit from a missing file",
        "useritem",
        "Recommender/Fit",
        lambda c: [rec.FitRequest(model=MODEL, path="missing.csv")],
        NOT_FOUND,
        "'missing.csv'",
        then=nothing_fitted,
    ),
    case(
        "useritem: Recommend naming no model before its first Fit",
        "useritem",
        "Recommender/Recommend",
        lambda c: rec.RecommendRequest(user_id="u0", k=3),
        grpc.StatusCode.FAILED_PRECONDITION,
        "call Fit first",
    ),
    case(
        "plain gateway: Recommend without a user-item worker",
        "plain-gateway",
        "Gateway/Recommend",
        lambda c: rec.RecommendRequest(model=MODEL, user_id="u0", k=3),
        grpc.StatusCode.UNIMPLEMENTED,
        "GATEWAY_USERITEM",
    ),
    case(
        "plain gateway: Fit without a user-item worker",
        "plain-gateway",
        "Gateway/Fit",
        lambda c: fit_rows(),
        grpc.StatusCode.UNIMPLEMENTED,
        "GATEWAY_USERITEM",
    ),
    # --- huge k -----------------------------------------------------------------------------------------------
    case(
        "gateway: Search k=0",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(input=pb.Input(text="a cat"), k=0),
        INVALID,
        "k=0",
        "1..1000",
    ),
    case(
        "gateway: Search k=2**32-1",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(vector=to_wire(unit(MINILM_DIM, 1)), space="minilm", k=2**32 - 1),
        INVALID,
        "k=4294967295",
        "1..1000",
    ),
    case(
        "shard: Search k=1001",
        "shard-a",
        "Index/Search",
        lambda c: idx.IndexSearchRequest(space=PROBE_SPACE, query=to_wire(unit(PROBE_DIM, 1)), k=1001),
        INVALID,
        "k=1001",
        "INDEX_MAX_K",
    ),
    case(
        "gateway: Recommend k=1001",
        "gateway",
        "Gateway/Recommend",
        lambda c: rec.RecommendRequest(model=MODEL, user_id="u0", k=1001),
        INVALID,
        "k=1001",
        "1..1000",
    ),
    case(
        "useritem: SimilarItems k=0",
        "useritem",
        "Recommender/SimilarItems",
        lambda c: rec.SimilarItemsRequest(model=MODEL, item_id="i0", k=0),
        INVALID,
        "k=0",
        "1..1000",
    ),
    # --- invalid UTF-8 in ids and texts (the bytes of an otherwise valid request) -----------------------------
    case(
        "gateway: Upsert of an id that is not UTF-8",
        "gateway",
        "Gateway/Upsert",
        lambda c: invalid_utf8(
            gw.UpsertRequest(
                space=OWN_SPACE, items=[gw.UpsertItem(id="PLACEHOLDER-ID", vector=to_wire(unit(OWN_DIM, 2)))]
            ),
            "PLACEHOLDER-ID",
        ),
        INVALID,
        "not a valid protobuf message",
    ),
    case(
        "shard: Delete of an id that is not UTF-8",
        "shard-a",
        "Index/Delete",
        lambda c: invalid_utf8(
            idx.IndexDeleteRequest(space=PROBE_SPACE, ids=["PLACEHOLDER-ID"]), "PLACEHOLDER-ID"
        ),
        INVALID,
        "not a valid protobuf message",
    ),
    case(
        "useritem: Recommend of a user_id that is not UTF-8",
        "useritem",
        "Recommender/Recommend",
        lambda c: invalid_utf8(
            rec.RecommendRequest(model=MODEL, user_id="PLACEHOLDER-ID", k=3), "PLACEHOLDER-ID"
        ),
        INVALID,
        "not a valid protobuf message",
    ),
    case(
        "text: a text that is not UTF-8",
        "text",
        "Encoder/Encode",
        lambda c: invalid_utf8(enc.EncodeRequest(inputs=texts("PLACEHOLDER-TEXT")), "PLACEHOLDER-TEXT"),
        INVALID,
        "not a valid protobuf message",
    ),
    case(
        "gateway: SimilarItems of an item_id that is not UTF-8",
        "gateway",
        "Gateway/SimilarItems",
        lambda c: invalid_utf8(
            rec.SimilarItemsRequest(model=MODEL, item_id="PLACEHOLDER-ID", k=3), "PLACEHOLDER-ID"
        ),
        INVALID,
        "not a valid protobuf message",
    ),
    # --- truncated messages and streams ---------------------------------------------------------------------
    case(
        "gateway: Search request cut short",
        "gateway",
        "Gateway/Search",
        lambda c: truncated(gw.SearchRequest(input=pb.Input(text="a cat sitting on a mat"), k=3)),
        INVALID,
        "not a valid protobuf message",
    ),
    case(
        "image: Encode request cut short",
        "image",
        "Encoder/Encode",
        lambda c: truncated(enc.EncodeRequest(inputs=images(image_files.one_pixel())), 20),
        INVALID,
        "not a valid protobuf message",
    ),
    case(
        "gateway: EncodeStream whose 2nd request is empty",
        "gateway",
        "Gateway/EncodeStream",
        lambda c: [
            enc.EncodeRequest(inputs=texts("first"), request_id="1"),
            enc.EncodeRequest(request_id="2"),
        ],
        INVALID,
        "inputs is empty",
    ),
    case(
        "text: EncodeStream whose 2nd message is cut short",
        "text",
        "Encoder/EncodeStream",
        lambda c: [
            enc.EncodeRequest(inputs=texts("first")),
            truncated(enc.EncodeRequest(inputs=texts("second one"))),
        ],
        INVALID,
        "not a valid protobuf message",
    ),
    case(
        "shard: UpsertStream whose 2nd message is cut short",
        "shard-b",
        "Index/UpsertStream",
        lambda c: [
            idx.IndexUpsertRequest(
                space=PROBE_SPACE, items=[idx.IndexItem(id="streamed", vector=to_wire(unit(PROBE_DIM, 60)))]
            ),
            truncated(
                idx.IndexUpsertRequest(
                    space=PROBE_SPACE, items=[idx.IndexItem(id="cut", vector=to_wire(unit(PROBE_DIM, 61)))]
                )
            ),
        ],
        INVALID,
        "not a valid protobuf message",
    ),
    case(
        "gateway: UpsertStream whose 2nd message is cut short",
        "gateway",
        "Gateway/UpsertStream",
        lambda c: [
            gw.UpsertRequest(
                space=OWN_SPACE, items=[gw.UpsertItem(id="own-streamed", vector=to_wire(unit(OWN_DIM, 62)))]
            ),
            truncated(
                gw.UpsertRequest(
                    space=OWN_SPACE, items=[gw.UpsertItem(id="own-cut", vector=to_wire(unit(OWN_DIM, 63)))]
                )
            ),
        ],
        INVALID,
        "not a valid protobuf message",
        then=not_stored("own-cut", OWN_SPACE, OWN_DIM, 63),
    ),
    case(
        "useritem: Fit whose 2nd message is cut short",
        "useritem",
        "Recommender/Fit",
        lambda c: [fit_rows()[0], truncated(fit_rows()[1], 3)],
        INVALID,
        "not a valid protobuf message",
        then=nothing_fitted,
    ),
    case(
        "gateway: Fit whose 2nd message is cut short",
        "gateway",
        "Gateway/Fit",
        lambda c: [fit_rows()[0], truncated(fit_rows()[1], 3)],
        INVALID,
        "not a valid protobuf message",
        then=nothing_fitted,
        timeout_s=3.0,
    ),
    # --- documented as OK ---------------------------------------------------------------------------------------
    case(
        "gateway: Delete of unknown ids",
        "gateway",
        "Gateway/Delete",
        lambda c: gw.DeleteRequest(space=OWN_SPACE, ids=["never-1", "never-2"]),
        OK,
    ),
    case(
        "gateway: Search of a known space with nothing indexed",
        "gateway",
        "Gateway/Search",
        lambda c: gw.SearchRequest(vector=to_wire(unit(32, 1)), space=c.clip_space, k=5),
        OK,
    ),
    # --- cancelled calls (last: they leave the workers busy for a moment) -------------------------------------
    case(
        "image: a 128-image batch cancelled",
        "image",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(model=IMAGE_MODEL, inputs=images(*noise_jpegs(128))),
        CANCELLED,
        cancel_after_s=0.3,
    ),
    case(
        "text: a long Encode cancelled",
        "text",
        "Encoder/Encode",
        lambda c: enc.EncodeRequest(inputs=long_texts(256)),
        CANCELLED,
        cancel_after_s=0.3,
    ),
    case(
        "gateway: a 96-image Encode cancelled",
        "gateway",
        "Gateway/Encode",
        lambda c: enc.EncodeRequest(inputs=images(*noise_jpegs(96))),
        CANCELLED,
        cancel_after_s=0.5,
    ),
    case(
        "shard: UpsertStream cancelled after its 1st request was acknowledged",
        "shard-b",
        "Index/UpsertStream",
        lambda c: stream_upserts("acked", INDEX_STREAM_WINDOW, 70),
        CANCELLED,
        cancel_after_s=0.1,
        read_first=1,
        then=acknowledged_item_kept,
    ),
    case(
        "shard: UpsertStream answers a lone request while the stream stays open",
        "shard-b",
        "Index/UpsertStream",
        lambda c: stream_upserts("lone", 1, 90),
        CANCELLED,
        cancel_after_s=0.1,
        read_first=1,
        timeout_s=10.0,
    ),
    case(
        "useritem: Fit cancelled mid-stream",
        "useritem",
        "Recommender/Fit",
        lambda c: fit_rows()[:1],
        CANCELLED,
        cancel_after_s=0.5,
        then=nothing_fitted,
    ),
    case(
        "gateway: Fit cancelled mid-stream",
        "gateway",
        "Gateway/Fit",
        lambda c: fit_rows()[:1],
        CANCELLED,
        cancel_after_s=0.5,
        then=nothing_fitted,
    ),
    # --- cold-start items (the content map's own cases: tests/integration/test_cold_start.py) -------------
    case(
        "gateway: FoldInItems on a model fitted without item content",
        "gateway",
        "Gateway/FoldInItems",
        lambda c: cpb.FoldInItemsRequest(
            model=MODEL, items=[cpb.ItemContent(item_id="new-1", inputs=texts("a new film"))]
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no content map",
        "item_content",
    ),
    case(
        "gateway: FoldInItems with a user id as content",
        "gateway",
        "Gateway/FoldInItems",
        lambda c: cpb.FoldInItemsRequest(
            model=MODEL, items=[cpb.ItemContent(item_id="new-1", inputs=[pb.Input(user_id="u1")])]
        ),
        INVALID,
        "items[0].inputs[0]",
        "text or an image",
    ),
    case(
        "useritem: FoldInItems with inputs, which only the gateway encodes",
        "useritem",
        "Recommender/FoldInItems",
        lambda c: cpb.FoldInItemsRequest(
            model=MODEL,
            content_space="minilm",
            items=[cpb.ItemContent(item_id="new-1", inputs=texts("a film"))],
        ),
        INVALID,
        "items[0].inputs",
        "gateway",
    ),
    case(
        "gateway: Fit of kind EASE with item content",
        "gateway",
        "Gateway/Fit",
        lambda c: [
            rec.FitRequest(
                model="ease-with-content",
                kind=rec.MODEL_KIND_EASE,
                interactions=interactions(ratings()),
                item_content=[cpb.ItemContent(item_id="i1", inputs=texts("a film"))],
            )
        ],
        INVALID,
        "item_content",
        "MODEL_KIND_MF",
    ),
]


def _params() -> list[object]:
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names), "case names must be distinct"
    return [pytest.param(c, id=c.name) for c in CASES]


# --- sending ------------------------------------------------------------------------------------------------------


def _payload(request: Request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def send(cluster: Cluster, item: Case) -> tuple[grpc.StatusCode, str]:
    """Send `item`'s request as raw bytes (no serializer: undecodable bytes go out as they are); its status."""
    channel = cluster.channel(item.target)
    path = f"/embeddings.v1.{item.method}"
    built = item.build(cluster)
    if item.method in STREAMING:
        assert isinstance(built, list)
        return _stream(channel, path, [_payload(r) for r in built], item)
    assert not isinstance(built, list)
    return _unary(channel, path, _payload(built), item)


def _unary(channel: grpc.Channel, path: str, payload: bytes, item: Case) -> tuple[grpc.StatusCode, str]:
    method = channel.unary_unary(path)
    if item.cancel_after_s is None:
        try:
            method(payload, timeout=item.timeout_s)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return OK, ""
    future = method.future(payload, timeout=item.timeout_s)
    time.sleep(item.cancel_after_s)
    future.cancel()
    return future.code(), future.details() or ""


def _stream(
    channel: grpc.Channel, path: str, payloads: list[bytes], item: Case
) -> tuple[grpc.StatusCode, str]:
    release = threading.Event()

    def requests() -> Iterator[bytes]:
        yield from payloads
        if item.cancel_after_s is not None:
            release.wait(30)  # a client that stops sending without ending its stream

    call = channel.stream_stream(path)(requests(), timeout=item.timeout_s)
    try:
        if item.cancel_after_s is not None:
            for _ in range(item.read_first):
                next(call)
            time.sleep(item.cancel_after_s)
            call.cancel()
        for _ in call:
            pass
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    finally:
        release.set()
    return OK, ""


def counted(service: Service, code: str, method: str | None = None) -> float:
    """Calls `service` has answered with `code` (of `method`, or of any method), from its /metrics."""
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("rpc_requests_total{")
        and f'code="{code}"' in line
        and (method is None or f'method="{method}"' in line)
    )


# --- the tests ------------------------------------------------------------------------------------------------------


def test_the_table_covers_every_service_with_at_least_40_cases() -> None:
    targets = {c.target for c in CASES}
    assert {"gateway", "plain-gateway", "text", "image", "shard-a", "shard-b", "useritem"} <= targets
    assert len(CASES) >= 40


@pytest.mark.parametrize("item", _params())
def test_bad_input_gets_its_documented_status_and_the_service_still_answers(
    cluster: Cluster, item: Case
) -> None:
    service, method = cluster.service(item.target), item.method.split("/")[1]
    cancelled_before = counted(service, "CANCELLED", method)
    code, details = send(cluster, item)
    assert code == item.code, f"{item.target} {item.method}: {code.name}: {details}"
    for fragment in item.fragments:
        assert fragment in details, (fragment, details)
    if item.cancel_after_s is not None and item.method not in STREAMING:
        # The service saw the call cancelled (not failed, not finished). Not for streams: a cancelled
        # request stream can read as ended on the server before gRPC cancels the handler, which then
        # finishes normally, so whether the server counts CANCELLED or OK is a race there.
        deadline = time.monotonic() + 10
        while counted(service, "CANCELLED", method) <= cancelled_before:
            assert time.monotonic() < deadline, f"{item.target} never counted {method} as CANCELLED"
            time.sleep(0.1)
    if item.then is not None:
        item.then(cluster)
    answers(cluster, item.target)
    every_service_is_whole(cluster)


def test_every_service_answers_a_valid_request(cluster: Cluster) -> None:
    for target in ("text", "image", "shard-a", "shard-b", "useritem", "gateway", "plain-gateway"):
        answers(cluster, target)
    every_service_is_whole(cluster)


def every_service_is_whole(cluster: Cluster) -> None:
    """Whatever ran before (each case checks this after itself, so no test has to run last): every process
    is up, no refused Fit changed a model, and this module's own processes never answered INTERNAL or
    UNKNOWN."""
    processes = [cluster.text, cluster.image, *cluster.shards.values(), cluster.useritem, cluster.gateway]
    assert all(process.running() for process in processes), [p.name for p in processes if not p.running()]
    nothing_fitted(cluster)
    for process in [*cluster.shards.values(), cluster.useritem, cluster.gateway]:
        assert counted(process, "INTERNAL") == counted(process, "UNKNOWN") == 0, process.name
