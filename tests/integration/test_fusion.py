"""A search across every space when parts of the system fail, with real processes: a gateway in front of
the session's text worker (MiniLM's space and the tiny CLIP's), a fake text worker whose model writes into
a third space ("fake", tests/fake_encoder.py; made slow at will) and two index shards (one frozen at will).

A space whose worker misses the caller's deadline is left out and named; a frozen shard is reported as in
a one-space search; the answer comes within the caller's deadline either way. (Fusion itself, on both index
backends: test_index_conformance.py; every space failing, bad input: tests/unit/test_fused_search.py and
test_bad_input.py.)"""

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import types_pb2 as pb

from harness.processes import Service, gateway, index_shard
from services.common.vectors import to_wire
from tests.fake_encoder import FakeEncoder, fake_encoder, fake_vector

pytestmark = pytest.mark.integration

SHARD_TIMEOUT_S = 1.0
TAG = {"test": "fusion-faults"}
QUERY = "red shoes"
CAPTIONS = {f"item-{n}": text for n, text in enumerate(
    ["a pair of red running shoes", "a blue wool hat", "red leather boots", "a green umbrella",
     "a cup of coffee", "a red silk scarf", "a pair of sandals", "a rocket launch"]
)}  # fmt: skip


@dataclass
class Fused:
    stub: gateway_pb2_grpc.GatewayStub
    shards: list[Service]
    fake: FakeEncoder


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory, log_dir: Path, text_service: Service) -> Iterator[Fused]:
    shards = [
        index_shard(tmp_path_factory.mktemp(f"fusion-shard-{n}"), {}, log_dir, name=f"fusion-shard-{n}")
        for n in range(2)
    ]
    settings = {"GATEWAY_SHARD_TIMEOUT_S": str(SHARD_TIMEOUT_S), "GATEWAY_MODEL_REFRESH_S": "1"}
    started: list[Service] = []
    with fake_encoder() as fake:
        front = gateway(
            [text_service.address, fake.address], "", settings, log_dir, shards=[s.address for s in shards]
        )
        front.name = "fusion-gateway"
        try:
            for shard in shards:
                shard.start()
                started.append(shard)
            for shard in shards:
                shard.wait_serving()
            front.start()
            started.append(front)
            front.wait_serving()
            with grpc.insecure_channel(front.address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                payload = '{"test": "fusion-faults"}'
                texts = [
                    gw.UpsertItem(id=i, input=pb.Input(text=t), payload_json=payload)
                    for i, t in CAPTIONS.items()
                ]
                assert stub.Upsert(gw.UpsertRequest(space="minilm", items=texts), timeout=60).upserted == 8
                # The fake space: the same ids, by vectors (its model's vector of the caption).
                vectors = [
                    gw.UpsertItem(id=i, vector=to_wire(fake_vector(t)), payload_json=payload)
                    for i, t in CAPTIONS.items()
                ]
                assert stub.Upsert(gw.UpsertRequest(space="fake", items=vectors), timeout=60).upserted == 8
                yield Fused(stub, shards, fake)
        finally:
            for process in started:
                process.signal(signal.SIGCONT)  # in case a failed test left a shard frozen
            for process in reversed(started):
                process.stop()


def fused_search(stub: gateway_pb2_grpc.GatewayStub, timeout: float) -> gw.SearchResponse:
    request = gw.SearchRequest(
        input=pb.Input(text=QUERY), k=8, all_spaces=True, filter=pb.SearchFilter(payload_equals=TAG)
    )
    return stub.Search(request, timeout=timeout)


def searched(response: gw.SearchResponse) -> dict[str, gw.SpaceSearched]:
    return {entry.model.space: entry for entry in response.spaces}


def test_every_space_answering_fuses_all_three(fused: Fused) -> None:
    response = fused_search(fused.stub, 30)
    spaces = searched(response)
    assert set(spaces) >= {"minilm", "fake"} and not response.partial, response
    assert (spaces["fake"].model.id, spaces["fake"].hits) == ("fake-text", 8)
    assert sorted(hit.id for hit in response.hits) == sorted(CAPTIONS)  # each id once, from both spaces
    assert all({s.model.space for s in hit.sources} == {"minilm", "fake"} for hit in response.hits)
    fake_ranks = {hit.id: s.rank for hit in response.hits for s in hit.sources if s.model.space == "fake"}
    query = fake_vector(QUERY) / np.linalg.norm(fake_vector(QUERY))
    expected = sorted(
        CAPTIONS,
        key=lambda i: -float(fake_vector(CAPTIONS[i]) @ query / np.linalg.norm(fake_vector(CAPTIONS[i]))),
    )
    assert sorted(fake_ranks, key=fake_ranks.__getitem__) == expected


def test_a_space_whose_worker_misses_the_deadline_is_named_and_the_others_answer(fused: Fused) -> None:
    fused.fake.delay_s = 120.0  # far past the caller's deadline
    try:
        response = fused_search(fused.stub, 8)  # OK within the caller's 8 s: the fake space is left out
    finally:
        fused.fake.delay_s = 0.0
    spaces = searched(response)
    assert response.partial and list(response.missing_spaces) == ["fake"], response
    assert "did not answer within the deadline" in spaces["fake"].error
    assert spaces["minilm"].hits == 8 and not spaces["minilm"].error
    assert sorted(hit.id for hit in response.hits) == sorted(CAPTIONS)
    assert all([s.model.space for s in hit.sources] == ["minilm"] for hit in response.hits)
    assert response.hits[0].id == "item-0"  # MiniLM's red running shoes
    assert fused.fake.settled(10), "the gateway left the slow worker's call running"


def test_a_frozen_shard_is_reported_and_the_other_shards_hits_are_fused(fused: Fused) -> None:
    frozen = fused.shards[1]
    frozen.signal(signal.SIGSTOP)
    try:
        response = fused_search(fused.stub, 30)
    finally:
        frozen.signal(signal.SIGCONT)
    spaces = searched(response)
    assert response.partial and not response.missing_spaces, response
    assert list(response.missing_shards) == [frozen.address]
    assert list(spaces["minilm"].missing_shards) == [frozen.address] == list(spaces["fake"].missing_shards)
    assert 0 < len(response.hits) < len(CAPTIONS)  # the answering shard's items only
    assert {hit.shard for hit in response.hits} == {fused.shards[0].address}
