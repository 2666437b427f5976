"""The Milvus backend when Milvus is not there, goes away in the middle of a bulk write, or stops answering:
every failure is UNAVAILABLE naming Milvus within the caller's time, nothing acknowledged is lost, and the
gateway carries on by itself once Milvus is back (no restart). Milvus here is Milvus Lite 2.5's server on a
loopback port, killed with SIGKILL or frozen with SIGSTOP."""

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc

from harness.processes import MilvusLite, Service, free_port, gateway, running
from services.common.vectors import to_wire

pytestmark = pytest.mark.integration

T = TypeVar("T")
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
GATEWAY_ENV = {
    "GATEWAY_INDEX_BACKEND": "milvus",
    "GATEWAY_SHARD_TIMEOUT_S": "2",
    "GATEWAY_WORKER_RECONNECT_MAX_S": "0.5",
    "GATEWAY_SHUTDOWN_GRACE_S": "2",
}


def unit_rows(count: int, dimension: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def upsert(stub: gateway_pb2_grpc.GatewayStub, space: str, ids: list[str], rows: np.ndarray) -> None:
    items = [gw.UpsertItem(id=item_id, vector=to_wire(row)) for item_id, row in zip(ids, rows, strict=True)]
    stub.Upsert(gw.UpsertRequest(space=space, items=items), timeout=10)


def until_available(call: Callable[[], T], within_s: float = 60.0) -> T:
    """`call()` until it stops answering UNAVAILABLE (what a client's retries do)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def milvus_gateway(uri: str, log_dir: Path) -> Service:
    return gateway([], "", {**GATEWAY_ENV, "GATEWAY_MILVUS_URI": uri}, log_dir)


@pytest.fixture
def milvus(tmp_path: Path, log_dir: Path) -> Iterator[MilvusLite]:
    server = MilvusLite(tmp_path / "milvus", log_dir)
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.signal(signal.SIGCONT)
        server.stop()


def test_a_milvus_that_is_not_there_is_unavailable_by_name_until_it_comes(
    tmp_path: Path, log_dir: Path
) -> None:
    port = free_port()
    with running(milvus_gateway(f"http://127.0.0.1:{port}", log_dir)) as front:  # starts without it
        with grpc.insecure_channel(front.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            rows = unit_rows(4, 8, 1)
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    upsert(stub, "waiting", ["a", "b", "c", "d"], rows)
                took = time.monotonic() - started
                assert caught.value.code() == UNAVAILABLE
                assert f"Milvus at 127.0.0.1:{port}" in (caught.value.details() or "")
                assert took < 8, f"{took:.1f}s: longer than GATEWAY_SHARD_TIMEOUT_S and its margin"
            with pytest.raises(grpc.RpcError) as caught:
                stub.Search(gw.SearchRequest(vector=to_wire(rows[0]), space="waiting", k=1), timeout=10)
            assert caught.value.code() == UNAVAILABLE and "Milvus at" in (caught.value.details() or "")
            with running(MilvusLite(tmp_path / "late", log_dir, port=port)):
                until_available(lambda: upsert(stub, "waiting", ["a", "b", "c", "d"], rows))
                found = stub.Search(
                    gw.SearchRequest(vector=to_wire(rows[2]), space="waiting", k=1), timeout=10
                )
                assert found.hits[0].id == "c"


def test_milvus_killed_in_the_middle_of_a_bulk_write_loses_nothing_acknowledged(
    milvus: MilvusLite, log_dir: Path
) -> None:
    rows = unit_rows(40 * 50, 16, 2)
    batches = [[f"bulk-{b}-{i}" for i in range(50)] for b in range(40)]
    acknowledged: list[str] = []
    failure: list[grpc.RpcError] = []
    first_ack = threading.Event()

    def stream(stub: gateway_pb2_grpc.GatewayStub) -> None:
        def requests() -> Iterator[gw.UpsertRequest]:
            for number, ids in enumerate(batches):
                chunk = rows[number * 50 : (number + 1) * 50]
                items = [gw.UpsertItem(id=i, vector=to_wire(row)) for i, row in zip(ids, chunk, strict=True)]
                yield gw.UpsertRequest(space="bulk", request_id=str(number), items=items)
                time.sleep(0.05)  # a steady bulk load, long enough to be cut in the middle

        try:
            for answer in stub.UpsertStream(requests(), timeout=60):
                acknowledged.extend(batches[int(answer.request_id)])
                first_ack.set()
        except grpc.RpcError as error:
            failure.append(error)
        first_ack.set()

    with (
        running(milvus_gateway(milvus.uri, log_dir)) as front,
        grpc.insecure_channel(front.address) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        writer = threading.Thread(target=stream, args=(stub,))
        writer.start()
        assert first_ack.wait(30)
        time.sleep(0.3)
        milvus.kill()
        writer.join(60)
        assert failure, "the stream should have failed when Milvus went away"
        assert failure[0].code() == UNAVAILABLE, failure[0].details()
        assert f"Milvus at {milvus.address}" in (failure[0].details() or "")
        assert 0 < len(acknowledged) < len(rows)

        milvus.start()  # the same port and data
        milvus.wait_ready()
        by_id = {item_id: rows[number] for number, item_id in enumerate(i for ids in batches for i in ids)}
        lost = []
        for item_id in acknowledged:
            found = until_available(
                lambda item_id=item_id: stub.Search(
                    gw.SearchRequest(vector=to_wire(by_id[item_id]), space="bulk", k=1), timeout=10
                )
            )
            if not found.hits or found.hits[0].id != item_id:
                lost.append(item_id)
        assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged ids lost, e.g. {lost[:3]}"
        upsert(stub, "bulk", ["after"], rows[:1])  # and writes go on, through the same gateway
        print(f"\n{len(acknowledged)} ids acknowledged before the kill, all found after the restart")


def test_a_frozen_milvus_is_unavailable_within_the_deadline_and_then_answers_again(
    milvus: MilvusLite, log_dir: Path
) -> None:
    rows = unit_rows(10, 8, 3)
    with (
        running(milvus_gateway(milvus.uri, log_dir)) as front,
        grpc.insecure_channel(front.address) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        upsert(stub, "frozen", [f"f-{n}" for n in range(10)], rows)
        milvus.signal(signal.SIGSTOP)
        try:
            for timeout in (
                10.0,
                1.0,
            ):  # GATEWAY_SHARD_TIMEOUT_S (2 s) governs, or the caller's sooner deadline
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Search(
                        gw.SearchRequest(vector=to_wire(rows[0]), space="frozen", k=3), timeout=timeout
                    )
                took = time.monotonic() - started
                assert caught.value.code() == UNAVAILABLE, caught.value.details()
                assert f"Milvus at {milvus.address} did not complete" in (caught.value.details() or "")
                assert took < min(timeout, 2.0) + 1.5, f"{took:.1f}s"
        finally:
            milvus.signal(signal.SIGCONT)
        found = until_available(
            lambda: stub.Search(gw.SearchRequest(vector=to_wire(rows[4]), space="frozen", k=1), timeout=10)
        )
        assert found.hits[0].id == "f-4"
