"""MicroBatcher: gathering, splitting, token budgets, groups by length, back-pressure, cancellation,
deadlines and failures."""

import asyncio
import itertools
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.encoder.batching import MicroBatcher, by_length
from tests.helpers import LATE_S

POISON = -1


class Model:
    """A fake model: records every batch, doubles each item, can be held on a gate or made to fail."""

    def __init__(self, blocked: bool = False, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        if not blocked:
            self.gate.set()
        self.delay_s = delay_s
        self.wrong_count = False

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.gate.wait(5)  # bounded, so a broken test cannot hang the suite
        if self.delay_s:
            time.sleep(self.delay_s)
        if POISON in items:
            raise ValueError(f"model failed on batch {items}")
        if self.wrong_count:
            return [x * 2 for x in items[:-1]]
        return [x * 2 for x in items]

    @property
    def seen(self) -> list[int]:
        return [x for batch in self.batches for x in batch]

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


MakeBatcher = Callable[..., tuple[MicroBatcher, Model]]


@pytest.fixture
async def make_batcher() -> AsyncIterator[MakeBatcher]:
    created: list[tuple[MicroBatcher, Model, ThreadPoolExecutor]] = []

    def make(
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.01,
        max_queue: int = 1000,
        blocked: bool = False,
        delay_s: float = 0.0,
        max_batch_tokens: int = 0,
        length: Callable[[int], int] = lambda _: 1,
        lanes: int = 1,
    ) -> tuple[MicroBatcher, Model]:
        model = Model(blocked=blocked, delay_s=delay_s)
        executor = ThreadPoolExecutor(lanes)
        batcher: MicroBatcher = MicroBatcher(
            f"test-{len(created)}",
            model,
            executor,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            max_batch_tokens=max_batch_tokens,
            length=length,
            lanes=lanes,
        )
        batcher.start()
        created.append((batcher, model, executor))
        return batcher, model

    yield make
    for batcher, model, executor in created:
        model.gate.set()
        await batcher.close()
        executor.shutdown(wait=True)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def hold_model(batcher: MicroBatcher, model: Model) -> asyncio.Task[list[int]]:
    """Send one input and wait until the (blocked) model is busy with it."""
    task = asyncio.create_task(batcher.submit([1000]))
    await until(lambda: bool(model.batches))
    return task


def sample(name: str, batcher: MicroBatcher) -> float:
    return REGISTRY.get_sample_value(name, {"batcher": batcher.name}) or 0.0


async def test_results_come_back_in_order_per_request(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher()
    requests = [[3, 1, 2], [10], [7, 8, 9, 4, 5], [42, 41]]
    results = await asyncio.gather(*(batcher.submit(items) for items in requests))
    assert results == [[x * 2 for x in items] for items in requests]
    assert sorted(model.seen) == sorted(x for items in requests for x in items)


async def test_empty_submit_returns_empty_without_calling_the_model(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher()
    assert await batcher.submit([]) == []
    assert model.batches == []


async def test_concurrent_submits_are_gathered_into_one_batch(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=32, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
    assert results == [[i * 2] for i in range(10)]
    assert len(model.batches) < 10
    assert model.sizes == [10]
    assert sorted(model.seen) == list(range(10))


async def test_inputs_arriving_within_max_wait_join_the_same_batch(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=32, max_wait_s=0.2)
    first = asyncio.create_task(batcher.submit([1, 2]))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(batcher.submit([3]))
    assert await first == [2, 4]
    assert await second == [6]
    assert model.batches == [[1, 2, 3]]


async def test_a_lone_input_waits_at_most_about_max_wait(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=32, max_wait_s=0.05)
    start = time.monotonic()
    assert await batcher.submit([5]) == [10]
    elapsed = time.monotonic() - start
    assert 0.04 <= elapsed < 0.05 + LATE_S
    assert model.sizes == [1]


async def test_a_full_batch_runs_without_waiting_for_max_wait(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=4, max_wait_s=3 * LATE_S)
    start = time.monotonic()
    assert await asyncio.wait_for(batcher.submit([1, 2, 3, 4]), 3 * LATE_S) == [2, 4, 6, 8]
    assert time.monotonic() - start < LATE_S
    assert model.batches == [[1, 2, 3, 4]]


async def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order(
    make_batcher: MakeBatcher,
) -> None:
    batcher, model = make_batcher(max_batch_size=4, max_wait_s=0.01)
    items = [9, 3, 7, 1, 8, 2, 6, 0, 5, 4]
    assert await batcher.submit(items) == [x * 2 for x in items]
    assert model.sizes == [4, 4, 2]
    assert model.seen == items


async def test_max_batch_size_is_never_exceeded_under_load(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=5, max_wait_s=0.005, delay_s=0.002)
    sizes = [1, 7, 3, 12, 5, 2, 9, 1, 4, 6, 11, 3]
    requests: list[Sequence[int]] = []
    start = 0
    for size in sizes:
        requests.append(list(range(start, start + size)))
        start += size

    async def send(index: int, items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.001 * (index % 4))
        return await batcher.submit(items)

    results = await asyncio.gather(*(send(i, items) for i, items in enumerate(requests)))
    assert results == [[x * 2 for x in items] for items in requests]
    assert max(model.sizes) <= 5
    assert sorted(model.seen) == list(range(start))  # every input exactly once


async def test_inputs_of_different_requests_share_model_calls(make_batcher: MakeBatcher) -> None:
    """Requests queued together are packed into full batches: the model is called about inputs / batch
    size times, where a batcher that never merged requests would call it once per request or more."""
    batcher, model = make_batcher(max_batch_size=5, max_wait_s=0.005, blocked=True)
    busy = await hold_model(batcher, model)
    sizes = [1, 7, 3, 12, 5, 2, 9, 1, 4, 6, 11, 3]
    requests = [list(range(sum(sizes[:i]), sum(sizes[: i + 1]))) for i in range(len(sizes))]
    pending = [asyncio.create_task(batcher.submit(items)) for items in requests]
    await until(lambda: batcher.queued == sum(sizes))
    model.gate.set()
    assert await asyncio.gather(*pending) == [[x * 2 for x in items] for items in requests]
    await busy
    batches = model.batches[1:]  # after the one that held the model
    owner = {x: i for i, items in enumerate(requests) for x in items}
    unmerged_calls = sum(-(-size // 5) for size in sizes)  # 19: one request per model call
    assert len(batches) == -(-sum(sizes) // 5) < unmerged_calls  # 13 full batches of 5 (the last of 4)
    assert all(len(batch) == 5 for batch in batches[:-1])
    assert sum(len({owner[x] for x in batch}) > 1 for batch in batches) >= len(batches) // 2


async def test_full_queue_refuses_at_once_with_resource_exhausted(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=2, max_wait_s=0.001, max_queue=4, blocked=True)
    busy = await hold_model(batcher, model)
    waiting = asyncio.create_task(batcher.submit([1, 2, 3, 4]))  # exactly fills the queue
    await until(lambda: batcher.queued == 4)
    rejected_before = sample("batch_queue_rejected_total", batcher)

    start = time.monotonic()
    with pytest.raises(ResourceExhausted) as refused:
        await batcher.submit([99])
    assert time.monotonic() - start < LATE_S  # not once the model is free (it never is, here)
    assert "limit 4" in refused.value.message
    assert sample("batch_queue_rejected_total", batcher) == rejected_before + 1

    model.gate.set()
    assert await busy == [2000]
    assert await waiting == [2, 4, 6, 8]
    assert 99 not in model.seen


async def test_batch_queue_depth_is_the_number_of_inputs_waiting(make_batcher: MakeBatcher) -> None:
    """The README's batch_queue_depth{batcher}: inputs waiting for a model batch, back to 0 once served."""
    batcher, model = make_batcher(max_batch_size=2, max_wait_s=0.001, blocked=True)
    busy = await hold_model(batcher, model)
    assert sample("batch_queue_depth", batcher) == 0
    waiting = [asyncio.create_task(batcher.submit(items)) for items in ([1, 2, 3], [4, 5])]
    await until(lambda: batcher.queued == 5)
    assert sample("batch_queue_depth", batcher) == 5
    model.gate.set()
    await asyncio.gather(busy, *waiting)
    assert sample("batch_queue_depth", batcher) == 0


async def test_cancelled_callers_inputs_never_reach_the_model(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=8, max_wait_s=0.001, blocked=True)
    busy = await hold_model(batcher, model)
    gone = asyncio.create_task(batcher.submit([100, 101, 102]))
    kept = asyncio.create_task(batcher.submit([200]))
    await until(lambda: batcher.queued == 4)
    dropped_before = sample("batch_dropped_total", batcher)

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    model.gate.set()

    assert await busy == [2000]
    assert await kept == [400]
    assert not {100, 101, 102} & set(model.seen)
    assert model.seen == [1000, 200]
    assert sample("batch_dropped_total", batcher) == dropped_before + 3


async def test_expired_deadline_raises_and_inputs_never_reach_the_model(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=8, max_wait_s=0.001, blocked=True)
    busy = await hold_model(batcher, model)
    late = asyncio.create_task(batcher.submit([7, 8], timeout=0.001))
    patient = asyncio.create_task(batcher.submit([9], timeout=30.0))
    await until(lambda: batcher.queued == 3)
    await asyncio.sleep(0.02)  # the short deadline passes while the model is busy
    model.gate.set()

    with pytest.raises(DeadlineExceeded):
        await late
    assert await patient == [18]
    assert await busy == [2000]
    assert not {7, 8} & set(model.seen)


async def test_model_error_reaches_every_request_of_the_batch_and_batcher_recovers(
    make_batcher: MakeBatcher,
) -> None:
    batcher, model = make_batcher(max_batch_size=32, max_wait_s=0.05)
    results = await asyncio.gather(
        batcher.submit([1]), batcher.submit([POISON, 2]), batcher.submit([3]), return_exceptions=True
    )
    assert len(model.batches) == 1
    assert all(isinstance(result, ValueError) for result in results)
    assert results[0] is results[1] is results[2]

    assert await batcher.submit([4, 5]) == [8, 10]
    assert model.batches[-1] == [4, 5]


async def test_model_error_in_one_part_of_a_split_request_fails_only_that_request(
    make_batcher: MakeBatcher,
) -> None:
    batcher, model = make_batcher(max_batch_size=2, max_wait_s=0.001)
    with pytest.raises(ValueError):
        await batcher.submit([1, POISON, 3, 4])
    assert await batcher.submit([6]) == [12]
    assert model.batches == [[1, POISON], [6]]  # the failed request's other half was not run


async def test_model_returning_the_wrong_number_of_results_fails_the_batch_not_the_batcher(
    make_batcher: MakeBatcher,
) -> None:
    batcher, model = make_batcher(max_batch_size=8, max_wait_s=0.001)
    model.wrong_count = True
    with pytest.raises(RuntimeError, match="returned 2 results for 3 inputs"):
        await asyncio.wait_for(batcher.submit([1, 2, 3]), 0.3)
    model.wrong_count = False
    assert await asyncio.wait_for(batcher.submit([4]), 0.3) == [8]


def own_length(item: int) -> int:
    """Items whose value is their length in tokens."""
    return item


async def test_a_batch_stops_at_the_token_budget(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=32, max_batch_tokens=10, length=own_length)
    assert await batcher.submit([4, 4, 4, 4, 1]) == [8, 8, 8, 8, 2]
    assert model.batches == [[4, 4], [1, 4, 4]]  # 4 + 4 + 4 is over 10; 4 + 4 + 1 is not (run by length)


async def test_an_input_longer_than_the_token_budget_runs_alone(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=32, max_batch_tokens=10, length=own_length)
    assert await batcher.submit([30, 2, 3]) == [60, 4, 6]
    assert model.batches == [[30], [2, 3]]


async def test_a_batch_full_of_tokens_runs_without_waiting_for_max_wait(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(
        max_batch_size=32, max_wait_s=3 * LATE_S, max_batch_tokens=10, length=own_length
    )
    start = time.monotonic()
    assert await asyncio.wait_for(batcher.submit([6, 4]), 3 * LATE_S) == [12, 8]
    assert time.monotonic() - start < LATE_S
    assert model.batches == [[4, 6]]


async def test_a_batch_runs_in_groups_of_similar_length_and_answers_in_order(
    make_batcher: MakeBatcher,
) -> None:
    batcher, model = make_batcher(max_batch_size=32, max_wait_s=0.05, length=own_length)
    requests = [[40, 3], [41, 2], [39], [3, 42]]
    results = await asyncio.gather(*(batcher.submit(items) for items in requests))
    assert results == [[x * 2 for x in items] for items in requests]
    assert model.batches == [[2, 3, 3], [39, 40, 41, 42]]  # one batch, two model calls, little padding


async def test_the_token_budget_still_takes_callers_in_turn(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(
        max_batch_size=32, max_batch_tokens=12, length=own_length, blocked=True, max_wait_s=0.001
    )
    busy = await hold_model(batcher, model)
    heavy = asyncio.create_task(batcher.submit([5, 5, 5, 5], caller="heavy"))
    await until(lambda: batcher.queued == 4)
    light = asyncio.create_task(batcher.submit([2], caller="light"))
    await until(lambda: batcher.queued == 5)
    model.gate.set()
    assert await light == [4]
    assert await heavy == [10, 10, 10, 10]
    assert await busy == [2000]
    assert model.batches[1] == [2, 5, 5]  # the light caller's input shares the heavy caller's first batch


def padded_cost(groups: list[list[int]], lengths: list[int], call_cost: int) -> int:
    return sum(len(group) * max(lengths[i] for i in group) + call_cost for group in groups)


def test_groups_by_length_cost_the_least_padding_plus_calls() -> None:
    rng = random.Random(7)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))]
        call_cost = rng.choice([0, 4, 16, 100])
        groups = by_length(lengths, call_cost)
        assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
        # Against every way of cutting the sorted inputs into runs:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(
            padded_cost(
                [order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], lengths, call_cost
            )
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert padded_cost(groups, lengths, call_cost) == best


def test_inputs_of_one_length_stay_one_group_in_order() -> None:
    assert by_length([7] * 5, 16) == [[0, 1, 2, 3, 4]]
    assert by_length([1] * 3, 0) == [[0, 1, 2]]


async def test_with_two_lanes_a_second_batch_runs_while_the_first_is_busy(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=2, max_wait_s=0.001, blocked=True, lanes=2)
    busy = await hold_model(batcher, model)
    second = asyncio.create_task(batcher.submit([1, 2]))
    third = asyncio.create_task(batcher.submit([3]))
    await until(lambda: len(model.batches) == 2)  # the first still held: two batches in the model at once
    assert model.batches == [[1000], [1, 2]] and batcher.queued == 1  # no third lane: [3] waits
    model.gate.set()
    assert (await busy, await second, await third) == ([2000], [2, 4], [6])
    assert model.batches[2] == [3]


async def test_with_two_lanes_a_failing_batch_fails_only_its_requests(make_batcher: MakeBatcher) -> None:
    batcher, model = make_batcher(max_batch_size=1, max_wait_s=0.001, blocked=True, lanes=2)
    busy = await hold_model(batcher, model)
    poisoned = asyncio.create_task(batcher.submit([POISON]))
    await until(lambda: len(model.batches) == 2)
    model.gate.set()
    assert await busy == [2000]
    with pytest.raises(ValueError):
        await poisoned
    assert await batcher.submit([4, 5]) == [8, 10]


def test_a_batcher_needs_at_least_one_lane() -> None:
    with pytest.raises(ValueError, match="lanes"):
        MicroBatcher(
            "no-lanes",
            lambda items: items,
            ThreadPoolExecutor(1),
            max_batch_size=1,
            max_wait_s=0,
            max_queue=1,
            lanes=0,
        )
