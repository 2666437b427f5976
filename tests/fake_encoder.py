"""A fake Encoder worker: enough of the Encoder contract for a gateway to route to it (ListModels lists one
text model), with no model behind it. Encode sleeps `delay_s` (0: answers at once; long: a slow worker)
before answering with a vector derived from each text's hash (the same text, the same vector), and counts
the calls in flight, those whose caller cancelled (or whose deadline passed) and those it finished. It runs
a grpc.aio server on a free loopback port in a thread of its own, with its own event loop."""

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc as enc_grpc
from embeddings.v1 import types_pb2 as pb

from harness.processes import free_port
from services.common.vectors import to_wire

MODEL = pb.ModelInfo(
    id="fake-text",
    version="fake-1",
    dimension=4,
    space="fake",
    input_kinds=[pb.INPUT_KIND_TEXT],
    max_input_tokens=128,
    description="a fake text model: hashes, after a sleep (tests/fake_encoder.py)",
)


def fake_vector(text: str) -> np.ndarray:
    """The fake model's output for `text`: 4 positive floats from its sha256."""
    words = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype="<u4")
    return (words.astype(np.float64) / 2**32 + 0.01).astype(np.float32)


@dataclass
class FakeEncoder(enc_grpc.EncoderServicer):
    """Counters are written on the server's loop and read from the test's thread (plain ints: no lock)."""

    delay_s: float = 0.0
    address: str = ""
    started: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    cancelled: int = 0
    finished: int = 0
    # time_remaining() of each Encode as it arrived: the deadline its caller (the gateway) gave it.
    budgets: list[float | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # every input of every Encode, in arrival order

    async def ListModels(
        self, request: enc.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> enc.ListModelsResponse:
        return enc.ListModelsResponse(models=[MODEL])

    async def Encode(
        self, request: enc.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> enc.EncodeResponse:
        self.started += 1
        self.budgets.append(context.time_remaining())
        self.texts.extend(item.text for item in request.inputs)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:  # grpc.aio cancels the handler when its caller cancels or times out
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        self.finished += 1
        return enc.EncodeResponse(
            model=pb.ModelRef(id=MODEL.id, version=MODEL.version, space=MODEL.space),
            embeddings=[
                pb.Embedding(vector=to_wire(fake_vector(item.text)), input_tokens=1)
                for item in request.inputs
            ],
            request_id=request.request_id,
        )

    def settled(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds (blocking) for no Encode to be in flight."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.in_flight == 0


@contextmanager
def fake_encoder(
    delay_s: float = 0.0, register: Callable[[grpc.aio.Server], None] | None = None
) -> Iterator[FakeEncoder]:
    """A FakeEncoder serving on its `address`, 127.0.0.1:<free port>, until the block ends; `register`
    adds more servicers to the same server (a fake Recommender, a fake Index, ...)."""
    servicer = FakeEncoder(delay_s, f"127.0.0.1:{free_port()}")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = grpc.aio.server()
        enc_grpc.add_EncoderServicer_to_server(servicer, server)
        if register is not None:
            register(server)
        server.add_insecure_port(servicer.address)
        await server.start()
        started.set()
        await stop.wait()
        await server.stop(grace=None)

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as error:  # reported to the test below
            failure.append(error)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="fake-encoder", daemon=True)
    thread.start()
    assert started.wait(10) and not failure, f"the fake encoder did not start: {failure}"
    try:
        yield servicer
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
