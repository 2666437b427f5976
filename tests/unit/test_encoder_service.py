"""The Encoder servicer's start-up: models are published only once every one of them has loaded."""

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import types_pb2 as pb

from services.common.model_card import ModelCard
from services.encoder.backend import EncoderBackend, Prepared
from services.encoder.models import BatchLimits, LoadedModels
from services.encoder.preparing import PrepareLimits
from services.encoder.service import EncoderService


class _Backend(EncoderBackend):
    """A 2-d text model whose `load` waits for `release` (set at once unless the test holds it)."""

    def __init__(self, model_id: str, release: threading.Event) -> None:
        self._id = model_id
        self._release = release

    def load(self) -> ModelCard:
        assert self._release.wait(10)
        return ModelCard(self._id, "v1", 2, "space", (pb.INPUT_KIND_TEXT,))

    def prepare(self, inputs: Sequence[pb.Input], strict: bool) -> list[Prepared]:
        return [Prepared(item.text) for item in inputs]

    def encode(self, batch: list[Prepared]) -> np.ndarray:
        return np.ones((len(batch), 2), dtype=np.float32)

    def probe_input(self) -> pb.Input:
        return pb.Input(text="probe")


async def test_list_models_is_empty_until_every_model_has_loaded() -> None:
    ready, held = threading.Event(), threading.Event()
    ready.set()
    service = EncoderService(
        LoadedModels(
            "test",
            [_Backend("first", ready), _Backend("second", held)],
            BatchLimits(max_batch_size=8, max_wait_s=0.001, max_queue=64),
            PrepareLimits(
                threads=1, max_queued_cost=64, caller_share=0.5, chunk_cost=8, setting="X", unit="inputs"
            ),
        ),
        max_inputs_per_request=8,
        stream_window=2,
    )
    starting = asyncio.create_task(service.start())
    try:
        await asyncio.sleep(0.2)  # "first" has loaded and passed its probe; "second" is still loading
        listed = await service.ListModels(enc.ListModelsRequest(), None)  # type: ignore[arg-type]
        assert list(listed.models) == []
        held.set()
        await asyncio.wait_for(starting, 10)
        listed = await service.ListModels(enc.ListModelsRequest(), None)  # type: ignore[arg-type]
        assert [model.id for model in listed.models] == ["first", "second"]
    finally:
        held.set()
        await service.close()
