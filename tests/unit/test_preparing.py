"""Admission and fair preparation: requests admitted by cost, prepared in chunks taken from the callers in
turn, dropped before any work when their caller has gone or their deadline has passed; and the
round-robin queue under it, and the micro-batcher's fair batches."""

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from embeddings.v1 import types_pb2 as pb

from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.common.model_card import ModelCard
from services.encoder.backend import EncoderBackend, Prepared
from services.encoder.batching import MicroBatcher
from services.encoder.fairness import RoundRobin
from services.encoder.preparing import PrepareLimits, Preparer


class _Recording(EncoderBackend):
    """A text 'model' whose prepare records which inputs it worked on, in order, and can be held."""

    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def cost(self, item: pb.Input) -> int:
        return len(item.text)

    def load(self) -> ModelCard:
        return ModelCard("m", "1", 2, "s", (pb.INPUT_KIND_TEXT,))

    def prepare(self, inputs: Sequence[pb.Input], strict: bool) -> list[Prepared]:
        self.started.set()
        assert self.gate.wait(10)
        for index, item in enumerate(inputs):
            if item.text.startswith("bad"):
                raise InvalidArgument("is bad", field=f"inputs[{index}].text")
            self.prepared.append(item.text)
        return [Prepared(item.text) for item in inputs]

    def encode(self, batch: list[Prepared]) -> np.ndarray:
        return np.ones((len(batch), 2), dtype=np.float32)

    def probe_input(self) -> pb.Input:
        return pb.Input(text="probe")


def texts(*values: str) -> list[pb.Input]:
    return [pb.Input(text=value) for value in values]


def limits(budget: int = 100, share: float = 0.5, chunk: int = 4, threads: int = 1) -> PrepareLimits:
    return PrepareLimits(threads, budget, share, chunk, "TEXT_MAX_QUEUED_CHARS", "characters")


@pytest.fixture
async def preparer() -> AsyncIterator[Preparer]:
    made = Preparer("test", limits())
    yield made
    made.close()


def test_round_robin_takes_callers_in_turn_and_each_in_order() -> None:
    queue: RoundRobin[str] = RoundRobin()
    for n in range(4):
        queue.push("heavy", f"h{n}")
    queue.push("light", "l0")
    queue.push("other", "o0")
    queue.push("light", "l1")
    assert len(queue) == 7
    assert sorted(queue.heads()) == ["h0", "l0", "o0"]
    assert [queue.pop() for _ in range(7)] == ["h0", "l0", "o0", "h1", "l1", "h2", "h3"]
    assert len(queue) == 0


async def test_a_request_over_a_callers_share_is_refused_before_any_work(preparer: Preparer) -> None:
    backend = _Recording()
    with pytest.raises(ResourceExhausted, match=r"holds 51 characters.*one caller may have 50 waiting"):
        await preparer.prepare(backend, texts("x" * 51), False, None, "a")
    assert backend.prepared == []
    assert [p.value for p in await preparer.prepare(backend, texts("x" * 50), False, None, "a")] == ["x" * 50]


async def test_one_caller_cannot_hold_more_than_its_share_while_others_still_get_in(
    preparer: Preparer,
) -> None:
    backend = _Recording()
    backend.gate.clear()
    held = asyncio.create_task(preparer.prepare(backend, texts("a" * 30), False, None, "heavy"))
    await asyncio.to_thread(backend.started.wait, 10)
    with pytest.raises(ResourceExhausted, match="this caller has 30 waiting"):
        await preparer.prepare(backend, texts("b" * 30), False, None, "heavy")
    light = asyncio.create_task(preparer.prepare(backend, texts("c" * 30), False, None, "light"))
    await asyncio.sleep(0)  # admitted: another caller gets in while the first holds its share
    with pytest.raises(ResourceExhausted, match=r"60 characters are waiting.*TEXT_MAX_QUEUED_CHARS=100"):
        await preparer.prepare(backend, texts("d" * 45), False, None, "third")
    backend.gate.set()
    assert len(await held) == 1 and len(await light) == 1
    await preparer.prepare(backend, texts("e" * 50), False, None, "heavy")  # all released


async def test_chunks_are_taken_from_the_callers_in_turn(preparer: Preparer) -> None:
    """A heavy request is cut into chunks (4 characters here); a light request that arrives while the heavy
    one is being prepared waits for one chunk, not for the whole request."""
    backend = _Recording()
    backend.gate.clear()
    heavy = asyncio.create_task(
        preparer.prepare(backend, texts(*(f"h{n}" for n in range(20))), False, None, "heavy")
    )
    await asyncio.to_thread(backend.started.wait, 10)
    light = asyncio.create_task(preparer.prepare(backend, texts("l0"), False, None, "light"))
    await asyncio.sleep(0.05)
    backend.gate.set()
    await asyncio.gather(heavy, light)
    assert backend.prepared.index("l0") <= 4  # after the first heavy chunk (2 inputs), at most one more
    assert [text for text in backend.prepared if text != "l0"] == [f"h{n}" for n in range(20)]


async def test_a_refusal_names_the_input_by_its_place_in_the_request(preparer: Preparer) -> None:
    backend = _Recording()
    with pytest.raises(InvalidArgument, match=r"^inputs\[5\]\.text is bad$"):
        await preparer.prepare(
            backend, texts("a1", "a2", "a3", "a4", "a5", "bad", "a6", "bad"), False, None, "a"
        )


async def test_a_request_whose_caller_left_is_dropped_before_its_chunks_are_worked_on(
    preparer: Preparer,
) -> None:
    backend = _Recording()
    backend.gate.clear()
    blocker = asyncio.create_task(preparer.prepare(backend, texts("b1"), False, None, "blocker"))
    await asyncio.to_thread(backend.started.wait, 10)
    leaving = asyncio.create_task(
        preparer.prepare(backend, texts("x1", "x2", "x3", "x4"), False, None, "leaver")
    )
    await asyncio.sleep(0.05)
    leaving.cancel()
    backend.gate.set()
    await blocker
    await preparer.prepare(backend, texts("after"), False, None, "other")
    assert backend.prepared == ["b1", "after"]


async def test_a_request_whose_deadline_passed_while_it_waited_is_not_worked_on(preparer: Preparer) -> None:
    backend = _Recording()
    backend.gate.clear()
    blocker = asyncio.create_task(preparer.prepare(backend, texts("b1"), False, None, "blocker"))
    await asyncio.to_thread(backend.started.wait, 10)
    late = asyncio.create_task(preparer.prepare(backend, texts("x1"), False, 0.01, "late"))
    await asyncio.sleep(0.1)
    backend.gate.set()
    with pytest.raises(DeadlineExceeded, match="deadline passed before its inputs were prepared"):
        await late
    await blocker
    assert backend.prepared == ["b1"]


async def test_the_micro_batcher_shares_each_batch_between_callers() -> None:
    """A caller with 64 inputs queued does not make a caller with one input wait for 8 batches of 8."""
    calls: list[list[str]] = []
    gate = threading.Event()

    def model(items: list[str]) -> list[str]:
        assert gate.wait(10)
        calls.append(items)
        return items

    with ThreadPoolExecutor(1) as thread:
        batcher: MicroBatcher[str, str] = MicroBatcher(
            "fair", model, thread, max_batch_size=8, max_wait_s=0.001, max_queue=1000
        )
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit(["warm"], None, "heavy"))  # occupies the model
            await asyncio.sleep(0.05)
            heavy = asyncio.create_task(batcher.submit([f"h{n}" for n in range(64)], None, "heavy"))
            await asyncio.sleep(0)
            light = asyncio.create_task(batcher.submit(["light"], None, "light"))
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.gather(first, heavy, light)
        finally:
            await batcher.close()
    batch_with_light = next(number for number, batch in enumerate(calls) if "light" in batch)
    assert batch_with_light == 1, calls  # the first batch after the one running when it arrived
    assert sum(len(batch) for batch in calls) == 66


def test_chunking_keeps_every_input_once_in_order() -> None:
    from services.encoder.preparing import _cut

    costs = [3, 1, 1, 9, 2, 2, 2, 1]
    chunks = _cut(costs, 4)
    assert [p for chunk in chunks for p in chunk] == list(range(len(costs)))
    assert chunks == [[0, 1], [2], [3], [4, 5], [6, 7]]
    assert all(sum(costs[p] for p in chunk) <= 4 or len(chunk) == 1 for chunk in chunks)


async def test_a_closed_preparer_takes_no_more_and_drops_what_waits() -> None:
    made = Preparer("closing", limits())
    backend = _Recording()
    backend.gate.clear()
    running = asyncio.create_task(made.prepare(backend, texts("r1"), False, None, "a"))
    await asyncio.to_thread(backend.started.wait, 10)
    waiting = asyncio.create_task(made.prepare(backend, texts("w1"), False, None, "b"))
    await asyncio.sleep(0.05)
    made.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    backend.gate.set()
    started = time.monotonic()
    await running
    assert time.monotonic() - started < 5
    with pytest.raises(Exception, match="shutting down"):
        await made.prepare(backend, texts("late"), False, None, "c")
    assert backend.prepared == ["r1"]
