"""ordered_pipeline: concurrent handling of a stream's requests, answered in arrival order."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.common.streaming import ordered_pipeline


async def stream(items: list[int], pulled: list[int] | None = None) -> AsyncIterator[int]:
    for item in items:
        if pulled is not None:
            pulled.append(item)
        yield item


async def collect(iterator: AsyncIterator[str]) -> list[str]:
    return [response async for response in iterator]


async def test_responses_come_back_in_request_order_when_later_ones_finish_first() -> None:
    finished: list[int] = []

    async def handle(request: int) -> str:
        await asyncio.sleep(0.01 * (5 - request))  # request 0 is the slowest
        finished.append(request)
        return f"response-{request}"

    responses = await collect(ordered_pipeline(stream(list(range(5))), handle, window=5))
    assert responses == [f"response-{i}" for i in range(5)]
    assert finished == [4, 3, 2, 1, 0]  # they really ran concurrently and finished out of order


async def test_order_is_kept_across_many_windows() -> None:
    delays = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]

    async def handle(request: int) -> str:
        await asyncio.sleep(0.001 * delays[request])
        return str(request)

    responses = await collect(ordered_pipeline(stream(list(range(len(delays)))), handle, window=4))
    assert responses == [str(i) for i in range(len(delays))]


async def test_empty_stream_yields_nothing() -> None:
    async def handle(request: int) -> str:
        raise AssertionError("no request to handle")

    assert await collect(ordered_pipeline(stream([]), handle, window=3)) == []


@pytest.mark.parametrize("window", [1, 3])
async def test_no_more_than_window_handlers_run_at_once(window: int) -> None:
    active = 0
    peak = 0

    async def handle(request: int) -> str:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.002 * (1 + request % 3))
        active -= 1
        return str(request)

    responses = await collect(ordered_pipeline(stream(list(range(20))), handle, window=window))
    assert responses == [str(i) for i in range(20)]
    assert peak == window


async def test_reading_stops_while_the_window_is_full() -> None:
    release = asyncio.Event()
    pulled: list[int] = []

    async def handle(request: int) -> str:
        await release.wait()
        return str(request)

    pipeline = ordered_pipeline(stream(list(range(10)), pulled), handle, window=3)
    first = asyncio.ensure_future(anext(pipeline))
    await asyncio.sleep(0.02)
    assert not first.done()
    assert pulled == [0, 1, 2]

    release.set()
    assert await first == "0"
    assert await collect(pipeline) == [str(i) for i in range(1, 10)]
    assert pulled == list(range(10))


async def test_a_handler_error_ends_the_stream_with_that_error_and_cancels_the_rest() -> None:
    cancelled: list[int] = []
    completed: list[int] = []

    async def handle(request: int) -> str:
        if request == 2:
            await asyncio.sleep(0.005)
            raise ValueError("bad request 2")
        try:
            await asyncio.sleep(0.001 if request < 2 else 5.0)
        except asyncio.CancelledError:
            cancelled.append(request)
            raise
        completed.append(request)
        return str(request)

    received: list[str] = []
    with pytest.raises(ValueError, match="bad request 2"):
        async for response in ordered_pipeline(stream(list(range(8))), handle, window=4):
            received.append(response)
    assert received == ["0", "1"]
    await asyncio.sleep(0)  # let the cancellations be delivered
    assert completed == [0, 1]
    assert cancelled and set(cancelled) <= {3, 4, 5, 6, 7}


async def test_an_answer_goes_out_while_the_caller_waits_before_sending_more() -> None:
    """A caller that sends one request and waits for its answer before sending the next one."""
    answered = asyncio.Event()

    async def requests() -> AsyncIterator[int]:
        yield 1
        await asyncio.wait_for(answered.wait(), timeout=2)  # times out if the answer is held back
        yield 2

    async def handle(request: int) -> str:
        return str(request)

    responses = []
    async for response in ordered_pipeline(requests(), handle, window=4):
        responses.append(response)
        answered.set()
    assert responses == ["1", "2"]
