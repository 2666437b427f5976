"""Hostile callers and careless operators against real processes, one test per class of attack (beside
test_bad_input.py, which covers malformed requests): no way around the gateway's authentication through a
worker's or a shard's port; idle streams and floods of calls cannot hold a service; heavy inputs do not
stall light ones; the caller's deadline governs a long bulk index; what Redis gives back is checked; an
unknown space's message names no other caller's spaces; payloads are standard, shallow JSON."""

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc, index_pb2_grpc
from embeddings.v1 import index_pb2 as idx
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from harness.processes import (
    RedisServer,
    Service,
    gateway,
    image_worker,
    index_shard,
    running,
    useritem_worker,
)
from services.common.vectors import to_wire
from services.gateway.cache import cache_key
from services.gateway.sharding import home_of, shard_of
from tests import image_files, system
from tests.helpers import images, metric, texts, vectors

pytestmark = pytest.mark.integration

MINILM = "all-MiniLM-L6-v2"
CALLERS = ["alpha", "beta", "gamma", *(f"t{n}" for n in range(10))]
MAX_CALLS, MAX_PER_CLIENT, IDLE_S = 24, 8, 2.0


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def unit(dim: int, seed: int) -> np.ndarray:
    row = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return row / np.linalg.norm(row)


@pytest.fixture(scope="module")
def guarded(
    log_dir: Path, text_service: Service, image_service: Service, redis_server: RedisServer
) -> Iterator[Service]:
    """A gateway with small call limits, a short stream idle timeout and one token per test caller."""
    settings = {
        **system.GATEWAY_ENV,
        "GATEWAY_AUTH_TOKENS": ",".join(CALLERS),
        "GATEWAY_MAX_CONCURRENT_CALLS": str(MAX_CALLS),
        "GATEWAY_MAX_CALLS_PER_CLIENT": str(MAX_PER_CLIENT),
        "GATEWAY_STREAM_IDLE_TIMEOUT_S": str(IDLE_S),
    }
    front = gateway([text_service.address, image_service.address], redis_server.url, settings, log_dir)
    front.name = "hostile-gateway"
    with running(front) as started:
        yield started


# --- B: no way around the gateway's authentication ----------------------------------------------------


def test_a_shard_that_anyone_could_call_refuses_to_start(tmp_path: Path, log_dir: Path) -> None:
    shard = index_shard(tmp_path / "open", {"INDEX_HOST": "0.0.0.0"}, log_dir, name="open-shard")
    shard.start()
    assert shard.wait(60) != 0
    assert "requires no credential" in shard.log_tail() and "INDEX_AUTH_TOKENS" in shard.log_tail()
    assert "index cannot start: " in shard.log_tail() and "Traceback" not in shard.log_tail()


@pytest.fixture(scope="module")
def locked(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, redis_server: RedisServer
) -> Iterator[dict]:
    """A shard and a user-item worker that require the backend token, behind a gateway that sends it and
    requires its own callers' tokens; and a second gateway that sends a wrong backend token."""
    data = tmp_path_factory.mktemp("locked")
    backend = {"INDEX_AUTH_TOKENS": "backend-secret", "USERITEM_AUTH_TOKENS": "backend-secret"}
    shard = index_shard(data / "shard", {**system.SHARD_ENV, **backend}, log_dir, name="locked-shard")
    worker = useritem_worker(data / "useritem", {**system.USERITEM_ENV, **backend}, log_dir)
    worker.name = "locked-useritem"
    with running(shard), running(worker):
        fronts = {}
        for name, token in (("right", "backend-secret"), ("wrong", "not-the-secret")):
            settings = {**system.GATEWAY_ENV, "GATEWAY_AUTH_TOKENS": "caller", "GATEWAY_BACKEND_TOKEN": token}
            fronts[name] = gateway(
                [], redis_server.url, settings, log_dir, shards=[shard.address], useritem=worker.address
            )
            fronts[name].name = f"locked-gateway-{name}"
        with running(fronts["right"]), running(fronts["wrong"]):
            yield {"shard": shard, "useritem": worker, **fronts}


def test_workers_and_shards_refuse_calls_without_the_gateways_token(locked: dict) -> None:
    with grpc.insecure_channel(locked["shard"].address) as channel:
        shard = index_pb2_grpc.IndexStub(channel)
        item = idx.IndexItem(id="sneak", vector=to_wire(unit(8, 1)))
        for call in (
            lambda: shard.Upsert(idx.IndexUpsertRequest(space="s", items=[item]), timeout=5),
            lambda: shard.Stats(idx.IndexStatsRequest(), timeout=5),
            lambda: shard.Delete(idx.IndexDeleteRequest(space="s", ids=["a"]), timeout=5),
            lambda: shard.Upsert(
                idx.IndexUpsertRequest(space="s", items=[item]), metadata=bearer("caller"), timeout=5
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
        # health stays open for probes
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(locked["useritem"].address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/embeddings.v1.Encoder/ListModels")(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_gateway_gets_through_with_its_token_and_a_wrong_token_gets_nothing(locked: dict) -> None:
    with grpc.insecure_channel(locked["right"].address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Search(gw.SearchRequest(vector=to_wire(unit(8, 1)), space="own", k=1), timeout=10)
        assert (
            caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        )  # the gateway's own callers need a token
        stub.Upsert(
            gw.UpsertRequest(space="own", items=[gw.UpsertItem(id="mine", vector=to_wire(unit(8, 1)))]),
            metadata=bearer("caller"),
            timeout=10,
        )
        found = stub.Search(
            gw.SearchRequest(vector=to_wire(unit(8, 1)), space="own", k=1),
            metadata=bearer("caller"),
            timeout=10,
        )
        assert [hit.id for hit in found.hits] == ["mine"]
        # a Fit streams through the gateway's token-carrying channel to the locked user-item worker
        rows = system.ratings()
        fit = stub.Fit(
            iter(
                [
                    rec.FitRequest(
                        model="mf",
                        interactions=[rec.Interaction(user_id=u, item_id=i, rating=r) for u, i, r in rows],
                    )
                ]
            ),
            metadata=bearer("caller"),
            timeout=120,
        )
        assert [progress for progress in fit][-1].done
        recommended = stub.Recommend(
            rec.RecommendRequest(model="mf", user_id="u0", k=3), metadata=bearer("caller"), timeout=10
        )
        assert len(recommended.items) == 3
    with grpc.insecure_channel(locked["wrong"].address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        item = gw.UpsertItem(id="forged", vector=to_wire(unit(8, 3)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Upsert(gw.UpsertRequest(space="own", items=[item]), metadata=bearer("caller"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "UNAUTHENTICATED" in caught.value.details()


# --- C: idle streams and floods cannot hold the gateway --------------------------------------------------


async def first_answer(call: grpc.aio.StreamStreamCall, text: str) -> grpc.StatusCode:
    """Send one request on an open EncodeStream; OK once its answer comes, else the code the call ended with."""
    try:
        await call.write(enc.EncodeRequest(inputs=texts(text)))
        answer = await call.read()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        # The call ended before (or while) it was written to. A write racing the server's status can fail
        # locally ("Internal error from Core", grpc/grpc#36066); the call's own status is the server's.
        return await call.code()
    return grpc.StatusCode.OK if answer is not grpc.aio.EOF else await call.code()


async def test_one_caller_holds_only_its_share_and_others_and_health_are_served(guarded: Service) -> None:
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        opened = [stub.EncodeStream(metadata=bearer("alpha")) for _ in range(MAX_PER_CLIENT + 5)]
        codes = await asyncio.gather(*(first_answer(call, f"held {n}") for n, call in enumerate(opened)))
        assert codes.count(grpc.StatusCode.OK) == MAX_PER_CLIENT, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 5, [code.name for code in codes]
        refused = [call for call, code in zip(opened, codes, strict=True) if code != grpc.StatusCode.OK]
        for call in refused:
            assert "per caller" in await call.details()
        # alpha's streams are open and held: another caller, and health, are still served
        answer = await stub.Encode(
            enc.EncodeRequest(inputs=texts("still served")), metadata=bearer("beta"), timeout=10
        )
        assert len(answer.embeddings) == 1
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        held = [call for call, code in zip(opened, codes, strict=True) if code == grpc.StatusCode.OK]
        for call in held:
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK


async def test_idle_streams_time_out_and_free_their_slots(guarded: Service) -> None:
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.monotonic()
        idle = [stub.EncodeStream(metadata=bearer("alpha")) for _ in range(MAX_PER_CLIENT)]
        for call in idle:  # never written to: each ends once the caller has been silent for the timeout
            assert await asyncio.wait_for(call.code(), IDLE_S + 60) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "STREAM_IDLE_TIMEOUT_S" in await call.details()
        assert time.monotonic() - started >= IDLE_S
        again = [stub.EncodeStream(metadata=bearer("alpha")) for _ in range(MAX_PER_CLIENT)]
        codes = await asyncio.gather(*(first_answer(call, "alpha again") for call in again))
        assert codes == [grpc.StatusCode.OK] * MAX_PER_CLIENT  # the slots were freed
        for call in again:
            await call.done_writing()


async def test_a_stream_that_keeps_sending_is_not_idle(guarded: Service) -> None:
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).EncodeStream(metadata=bearer("gamma"))
        for n in range(4):  # a message every 0.75 idle timeouts: 3 idle timeouts in all
            await call.write(enc.EncodeRequest(inputs=texts(f"slow but alive {n}"), request_id=str(n)))
            assert (await call.read()).request_id == str(n)
            await asyncio.sleep(IDLE_S * 0.75)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_a_flood_past_the_limit_is_refused_resource_exhausted_and_counted(guarded: Service) -> None:
    before = metric(
        guarded.metrics_port, "rpc_requests_total", method="EncodeStream", code="RESOURCE_EXHAUSTED"
    )
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        calls = [stub.EncodeStream(metadata=bearer(f"t{n % 10}")) for n in range(80)]  # 8 callers' worth held
        codes = await asyncio.gather(*(asyncio.wait_for(call.code(), IDLE_S + 60) for call in calls))
    counts = {code: codes.count(code) for code in set(codes)}
    assert set(counts) == {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}, counts
    assert (
        counts[grpc.StatusCode.DEADLINE_EXCEEDED] <= MAX_CALLS
    )  # held (then idle): never more than the limit
    refused = counts[grpc.StatusCode.RESOURCE_EXHAUSTED]
    after = metric(
        guarded.metrics_port, "rpc_requests_total", method="EncodeStream", code="RESOURCE_EXHAUSTED"
    )
    assert after - before == refused  # every refusal answered and counted, none CANCELLED


# --- C: heavy inputs do not stall light ones ---------------------------------------------------------------


def gradient_png(side: int, seed: int) -> bytes:
    """A large, smooth, distinct PNG (small file, many pixels): expensive to decode, cheap to send."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack(
        [
            np.add.outer(ramp, ramp * 0.5) % 256,
            np.add.outer(ramp * 0.3, ramp) % 256,
            np.full((side, side), seed % 256),
        ],
        -1,
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


async def test_a_light_image_is_not_stalled_behind_a_heavy_callers_large_ones(guarded: Service) -> None:
    heavy_pictures = [gradient_png(2800, seed) for seed in range(24)]
    light = images(image_files.one_pixel())
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.monotonic()
        heavy = asyncio.gather(
            *(
                stub.Encode(
                    enc.EncodeRequest(model="efficientnet-lite0", inputs=images(*heavy_pictures[n::4])),
                    metadata=bearer("alpha"),
                    timeout=300,
                )
                for n in range(4)
            )
        )
        await asyncio.sleep(0.3)  # the heavy requests are admitted and being decoded
        light_started = time.monotonic()
        answer = await stub.Encode(
            enc.EncodeRequest(model="efficientnet-lite0", inputs=light), metadata=bearer("beta"), timeout=300
        )
        light_s = time.monotonic() - light_started
        await heavy
        heavy_s = time.monotonic() - started
    print(
        f"\nlight image beside 24 heavy PNGs: answered in {light_s:.2f} s; the heavy ones took {heavy_s:.2f} s"
    )
    assert len(answer.embeddings) == 1
    # First come, first served, the light image waited for every heavy one; in turn, for about one of them.
    assert light_s < heavy_s / 3, f"light call {light_s:.2f} s while the heavy ones took {heavy_s:.2f} s"


# --- D: the caller's deadline governs -------------------------------------------------------------------


def test_a_long_bulk_index_is_governed_by_the_callers_deadline(
    tmp_path: Path, log_dir: Path, image_service: Service, redis_server: RedisServer
) -> None:
    """GATEWAY_WORKER_TIMEOUT_S applies only to calls without a deadline: a bulk index through the CLI,
    whose calls carry long deadlines, is not cut at it."""
    shard = index_shard(tmp_path / "shard", system.SHARD_ENV, log_dir, name="deadline-shard")
    settings = {**system.GATEWAY_ENV, "GATEWAY_WORKER_TIMEOUT_S": "0.05"}
    front = gateway([image_service.address], "", settings, log_dir, shards=[shard.address])
    front.name = "deadline-gateway"
    folder = tmp_path / "crops"
    names = system.write_crops(folder, 24, seed=7)
    with running(shard), running(front), grpc.insecure_channel(front.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        pictures = [pb.Input(image=(folder / name).read_bytes()) for name in names[:8]]
        with pytest.raises(grpc.RpcError) as caught:  # the setting bites a call without a deadline
            stub.Encode(enc.EncodeRequest(model="imagenet-label-space", inputs=pictures))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        command = [sys.executable, "-m", "embeddings_client.cli", "--json", "index", str(folder)]
        result = subprocess.run(
            [*command, "--model", "imagenet-label-space", "--batch", "4"],
            env={**os.environ, "EMBEDDINGS_ADDRESS": front.address, "EMBEDDINGS_TOKEN": ""},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["indexed"] == len(names)


# --- A: what Redis gives back is checked ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flipped byte", "wrong dimension", "nan", "garbage"])
def test_a_damaged_cache_entry_is_recomputed_not_served(
    guarded: Service, redis_server: RedisServer, damage: str
) -> None:
    text = f"a sentence whose cache entry gets a {damage}"
    with grpc.insecure_channel(guarded.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        def encode() -> enc.EncodeResponse:
            request = enc.EncodeRequest(
                model=MINILM, inputs=texts(text), options=pb.EncodeOptions(normalize=False)
            )
            return stub.Encode(request, metadata=bearer("gamma"), timeout=30)

        first = encode()
        assert not first.embeddings[0].cached
        client = redis.Redis.from_url(redis_server.url)
        key = cache_key(MINILM, first.model.version, pb.Input(text=text))
        blob = client.get(key)
        assert blob is not None
        if damage == "flipped byte":
            blob = blob[:-3] + bytes([blob[-3] ^ 0x20]) + blob[-2:]
        elif damage == "wrong dimension":
            blob = blob[: len(blob) - 4 * 10]
        elif damage == "nan":
            values = np.frombuffer(blob[13:], dtype="<f4").copy()
            values[0] = np.nan
            blob = blob[:13] + values.tobytes()
        else:
            blob = b"not a vector"
        client.set(key, blob)
        invalid = metric(guarded.metrics_port, "cache_invalid_total", model=MINILM)
        second = encode()
        assert not second.embeddings[0].cached  # a miss, recomputed by the worker
        np.testing.assert_array_equal(vectors(second), vectors(first))
        assert metric(guarded.metrics_port, "cache_invalid_total", model=MINILM) == invalid + 1
        assert encode().embeddings[0].cached  # written back whole


# --- B: messages say what to fix and nothing more; payloads are standard JSON ----------------------------


def test_an_unknown_space_names_no_other_callers_spaces(locked: dict) -> None:
    with grpc.insecure_channel(locked["right"].address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for n in range(30):
            item = gw.UpsertItem(id="x", vector=to_wire(unit(4, n)))
            stub.Upsert(
                gw.UpsertRequest(space=f"private-space-{n}", items=[item]),
                metadata=bearer("caller"),
                timeout=10,
            )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Search(
                gw.SearchRequest(vector=to_wire(unit(4, 1)), space="nope", k=1),
                metadata=bearer("caller"),
                timeout=10,
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nope' is unknown" in caught.value.details()
    assert "private-space" not in caught.value.details() and len(caught.value.details()) < 400


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ('{"score": NaN}', "not valid JSON"),
        ('{"score": Infinity}', "not valid JSON"),
        ('{"big": 1e999}', "not valid JSON"),
        ('{"a": ' + "[" * 7999 + "1" + "]" * 7999 + "}", "nests deeper than"),
    ],
)
def test_payloads_are_standard_shallow_json(locked: dict, payload: str, words: str) -> None:
    with grpc.insecure_channel(locked["right"].address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        item = gw.UpsertItem(id="p", vector=to_wire(unit(8, 2)), payload_json=payload)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Upsert(gw.UpsertRequest(space="own", items=[item]), metadata=bearer("caller"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].payload_json" in caught.value.details() and words in caught.value.details()


# --- C: shutdown keeps its promise ---------------------------------------------------------------------


def test_sigterm_during_heavy_decoding_stops_within_the_grace(log_dir: Path) -> None:
    settings = {
        "IMAGE_LABEL_SPACE_ENABLED": "false",
        "IMAGE_SHUTDOWN_GRACE_S": "1",
        "IMAGE_MAX_IMAGE_BYTES": "20000000",
    }
    worker = image_worker(settings, log_dir)
    worker.name = "shutdown-image"
    heavy = [gradient_png(2800, 100 + n) for n in range(12)]
    with running(worker), grpc.insecure_channel(worker.address) as channel:
        call = channel.unary_unary(
            "/embeddings.v1.Encoder/Encode",
            request_serializer=enc.EncodeRequest.SerializeToString,
            response_deserializer=enc.EncodeResponse.FromString,
        )
        futures = [call.future(enc.EncodeRequest(inputs=images(*heavy[n::3])), timeout=300) for n in range(3)]
        time.sleep(1.0)  # decoding
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        stopped_s = time.monotonic() - started
        codes, details = [], []
        for future in futures:
            try:
                future.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:  # ended by the service, with a status: not a cut connection
                codes.append(error.code())
                details.append(error.details() or "")
    print(f"\nSIGTERM during heavy decoding (1 s grace): exited after {stopped_s:.1f} s; callers got {codes}")
    assert stopped_s < 1 + 10, f"stopped {stopped_s:.1f} s after SIGTERM with a 1 s grace"
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert all("shutting down" in detail for detail in details), details


# --- A: a space has one dimension everywhere; a space can be dropped ---------------------------------------


@pytest.fixture(scope="module")
def two_fronts(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, redis_server: RedisServer
) -> Iterator[dict]:
    """Two index shards, and two gateways in front of both (no workers: vector-only spaces)."""
    data = tmp_path_factory.mktemp("spaces")
    shards = [
        index_shard(data / f"shard-{n}", system.SHARD_ENV, log_dir, name=f"space-shard-{n}") for n in range(2)
    ]
    for shard in shards:
        shard.start()
    for shard in shards:
        shard.wait_serving()
    addresses = [shard.address for shard in shards]
    fronts = [gateway([], "", system.GATEWAY_ENV, log_dir, shards=addresses) for _ in range(2)]
    try:
        for number, front in enumerate(fronts):
            front.name = f"space-gateway-{number}"
            front.start()
        for front in fronts:
            front.wait_serving()
        yield {"shards": shards, "fronts": fronts}
    finally:
        for process in [*fronts, *shards]:
            process.stop()


def retry_unavailable(call: Any, within_s: float = 60.0) -> Any:
    """`call()` until the gateway reaches the restarted shard (UNAVAILABLE is safe to retry as it is)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def every_front_reaches_every_shard(two_fronts: dict) -> None:
    """Whatever an earlier test did to the shards (one restarts a shard: a gateway that has not called it
    since may still be in reconnect back-off), each gateway writes to both shards before the test starts."""
    items = [gw.UpsertItem(id=f"reach-{i}", vector=to_wire(unit(8, 900 + i))) for i in range(8)]
    assert {shard_of(item.id, 2) for item in items} == {0, 1}
    for front in two_fronts["fronts"]:
        with grpc.insecure_channel(front.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            retry_unavailable(lambda: stub.Upsert(gw.UpsertRequest(space="reach", items=items), timeout=10))  # noqa: B023


def held(shard: Service, space: str) -> tuple[int, int, int] | None:
    """(dimension, items, generation) of `space` on `shard`, from its own Stats; None: not held."""
    with grpc.insecure_channel(shard.address) as channel:
        stats = index_pb2_grpc.IndexStub(channel).Stats(idx.IndexStatsRequest(space=space), timeout=10)
    entries = [(entry.dimension, int(entry.count), int(entry.epoch)) for entry in stats.spaces]
    return entries[0] if entries else None


async def test_two_gateways_racing_to_create_a_space_agree_on_one_dimension(two_fronts: dict) -> None:
    await asyncio.to_thread(every_front_reaches_every_shard, two_fronts)
    channels = [grpc.aio.insecure_channel(front.address) for front in two_fronts["fronts"]]
    try:
        stubs = [gateway_pb2_grpc.GatewayStub(channel) for channel in channels]

        async def write(space: str, n: int) -> tuple[int, grpc.StatusCode, str]:
            dimension = 8 if n % 2 else 16
            items = [
                gw.UpsertItem(id=f"{space}-{n}-{i}", vector=to_wire(unit(dimension, 100 * n + i)))
                for i in range(6)
            ]
            try:
                await stubs[n % 2].Upsert(gw.UpsertRequest(space=space, items=items), timeout=30)
            except grpc.aio.AioRpcError as error:
                return dimension, error.code(), error.details() or ""
            return dimension, grpc.StatusCode.OK, ""

        for space in (f"race-{n}" for n in range(4)):
            results = await asyncio.gather(*(write(space, n) for n in range(12)))
            winners = {dimension for dimension, code, _ in results if code == grpc.StatusCode.OK}
            assert len(winners) == 1, results
            (won,) = winners
            for dimension, code, details in results:
                if dimension != won:
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
                    assert f"holds {won}-dimensional vectors" in details
            holders = [held(shard, space) for shard in two_fronts["shards"]]
            assert {entry[0] for entry in holders if entry is not None} == {won}, holders
            assert (
                sum(entry[1] for entry in holders if entry is not None) == 6 * 6
            )  # every winning write, whole
    finally:
        for channel in channels:
            await channel.close()


def test_a_dropped_space_is_gone_everywhere_and_can_come_back_with_another_dimension(
    two_fronts: dict,
) -> None:
    every_front_reaches_every_shard(two_fronts)
    first, second = two_fronts["fronts"]
    with grpc.insecure_channel(first.address) as a, grpc.insecure_channel(second.address) as b:
        one, other = gateway_pb2_grpc.GatewayStub(a), gateway_pb2_grpc.GatewayStub(b)
        old = [gw.UpsertItem(id=f"old-{i}", vector=to_wire(unit(8, i))) for i in range(10)]
        one.Upsert(gw.UpsertRequest(space="cycle", items=old), timeout=10)
        assert (
            other.Search(gw.SearchRequest(vector=to_wire(unit(8, 3)), space="cycle", k=1), timeout=10)
            .hits[0]
            .id
            == "old-3"
        )
        dropped = one.DropSpace(gw.DropSpaceRequest(space="cycle"), timeout=10)
        assert (dropped.dropped, list(dropped.missing_shards)) == (10, [])
        assert all(held(shard, "cycle") is None for shard in two_fronts["shards"])
        # the other gateway still remembers the old claim: its write claims afresh, its search is refused as
        # stale by the shards and looks the space up again
        new = [gw.UpsertItem(id=f"new-{i}", vector=to_wire(unit(16, i))) for i in range(10)]
        other.Upsert(gw.UpsertRequest(space="cycle", items=new), timeout=10)
        found = other.Search(gw.SearchRequest(vector=to_wire(unit(16, 4)), space="cycle", k=20), timeout=10)
        assert sorted(hit.id for hit in found.hits) == sorted(item.id for item in new)
        assert {held(shard, "cycle")[0] for shard in two_fronts["shards"] if held(shard, "cycle")} == {16}
        with pytest.raises(grpc.RpcError) as caught:
            one.DropSpace(gw.DropSpaceRequest(space="never-made"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_shard_down_during_a_drop_never_shows_the_dropped_items(two_fronts: dict) -> None:
    front = two_fronts["fronts"][0]
    away = two_fronts["shards"][1]
    space = next(f"outage-{n}" for n in range(100) if home_of(f"outage-{n}", 2) == 0)  # its home stays up
    items = [gw.UpsertItem(id=f"kept-{i}", vector=to_wire(unit(8, 50 + i))) for i in range(12)]
    with grpc.insecure_channel(front.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stub.Upsert(gw.UpsertRequest(space=space, items=items), timeout=10)
        on_home = sum(1 for item in items if shard_of(item.id, 2) == 0)
        assert 0 < on_home < len(items), "the items should be on both shards"
        away.stop()
        dropped = stub.DropSpace(gw.DropSpaceRequest(space=space), timeout=10)
        assert list(dropped.missing_shards) == [away.address] and dropped.dropped == on_home
        away.start()
        away.wait_serving()
        assert held(away, space) is not None  # its copy is still on its disk...
        with pytest.raises(grpc.RpcError) as caught:  # ...but the space is gone for searches
            stub.Search(gw.SearchRequest(vector=to_wire(unit(8, 50)), space=space, k=3), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown" in caught.value.details()
        again = [gw.UpsertItem(id=f"again-{i}", vector=to_wire(unit(4, i))) for i in range(12)]
        retry_unavailable(lambda: stub.Upsert(gw.UpsertRequest(space=space, items=again), timeout=10))
        found = stub.Search(gw.SearchRequest(vector=to_wire(unit(4, 2)), space=space, k=50), timeout=10)
        assert sorted(hit.id for hit in found.hits) == sorted(item.id for item in again)
        entry = held(away, space)
        assert entry is not None and entry[0] == 4 and entry[2] == 1  # the old copy went with its next write
