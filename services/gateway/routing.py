"""Which worker serves which model: learnt from the workers' ListModels, refreshed in the background.

Models are routed by id; several workers serving one model share its calls round-robin. A worker
that stops answering keeps its last known models, so a call for them gets UNAVAILABLE (the worker is
down) rather than INVALID_ARGUMENT (no such model).
"""

import asyncio
import itertools
import logging
from collections.abc import Sequence

import grpc
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import encoder_pb2_grpc as enc_grpc
from embeddings.v1 import types_pb2 as pb

from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.common.inputs import kind_name
from services.common.model_card import ModelCard
from services.gateway import metrics
from services.gateway.channels import BackendChannels
from services.gateway.relaying import relayed

log = logging.getLogger("routing")


class Worker:
    def __init__(self, address: str, channels: BackendChannels, empty_is_ready: bool = False) -> None:
        self.address = address
        # An encoder lists no models only while loading; a user-item worker lists none until its first Fit.
        self.empty_is_ready = empty_is_ready
        self.channel = channels.open(address)
        self.encoder = enc_grpc.EncoderStub(self.channel)
        self.cards: list[ModelCard] = []
        self.ready = False


class Router:
    def __init__(
        self,
        addresses: Sequence[str],
        refresh_s: float,
        channels: BackendChannels,
        trained_on_demand: Sequence[str] = (),
    ) -> None:
        """`trained_on_demand`: workers (user-item) whose models appear as they are trained."""
        self.workers = [Worker(address, channels) for address in addresses] + [
            Worker(address, channels, empty_is_ready=True) for address in trained_on_demand
        ]
        self._refresh_s = refresh_s
        self._routes: dict[str, list[Worker]] = {}
        self._turns: dict[str, itertools.count] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Wait until at least one encoder worker (if any is configured) has listed its models, then keep
        the routes fresh."""
        encoders = [worker for worker in self.workers if not worker.empty_is_ready]
        await self.refresh()
        while encoders and not any(worker.ready for worker in encoders):
            await asyncio.sleep(0.5)
            await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for worker in self.workers:
            await worker.channel.close()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._list_models(worker) for worker in self.workers))
        routes: dict[str, list[Worker]] = {}
        for worker in self.workers:
            for card in worker.cards:
                routes.setdefault(card.id, []).append(worker)
        self._routes = routes

    async def _list_models(self, worker: Worker) -> None:
        try:
            response = await worker.encoder.ListModels(enc.ListModelsRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as error:
            if worker.ready:
                log.warning("worker %s unreachable: %s", worker.address, error.code().name)
            worker.ready = False
            return
        if not response.models and not worker.empty_is_ready:
            worker.ready = False  # up but still loading: keep routing its models (calls get UNAVAILABLE)
            return
        if not worker.ready or len(response.models) != len(worker.cards):
            log.info("worker %s serves %s", worker.address, [m.id for m in response.models])
        worker.ready = True
        worker.cards = [ModelCard.from_proto(info) for info in response.models]

    @property
    def cards(self) -> list[ModelCard]:
        return [self.card(model) for model in sorted(self._routes)]

    @property
    def spaces(self) -> dict[int, set[str]]:
        """For each input kind, the spaces some served model writes that kind into."""
        spaces: dict[int, set[str]] = {}
        for card in self.cards:
            for kind in card.input_kinds:
                spaces.setdefault(kind, set()).add(card.space)
        return spaces

    def card(self, model_id: str) -> ModelCard:
        workers = self._routes.get(model_id)
        if not workers:
            raise self._unknown(f"model {model_id!r}")
        return next(card for card in workers[0].cards if card.id == model_id)

    def default_card(self, kind: int, preferred: str, space: str = "") -> ModelCard:
        """The model for inputs of `kind` when none is named: `preferred` if it fits, else the first that does."""
        fitting = [
            card for card in self.cards if kind in card.input_kinds and (not space or card.space == space)
        ]
        for card in fitting:
            if card.id == preferred:
                return card
        if fitting:
            return fitting[0]
        where = f" in space {space!r}" if space else ""
        raise self._unknown(f"a model for {kind_name(kind)} inputs{where}")

    def _unknown(self, what: str) -> ServiceError:
        served = ", ".join(sorted(self._routes)) or "none"
        down = [worker.address for worker in self.workers if not worker.ready]
        if down:
            return Unavailable(
                f"{what} is not served by any ready worker (served: {served}); "
                f"workers unreachable or still loading: {', '.join(down)}"
            )
        return InvalidArgument(f"{what} is not served here; models: {served} (see ListModels)")

    async def encode(
        self, model_id: str, inputs: Sequence[pb.Input], strict: bool, timeout: float
    ) -> enc.EncodeResponse:
        """Raw (full float32, unnormalised) vectors from a worker serving `model_id`."""
        workers = self._routes.get(model_id)
        if not workers:
            raise self._unknown(f"model {model_id!r}")
        turn = next(self._turns.setdefault(model_id, itertools.count()))
        worker = workers[turn % len(workers)]
        request = enc.EncodeRequest(
            model=model_id,
            inputs=inputs,
            options=pb.EncodeOptions(normalize=False, dtype=pb.DTYPE_FLOAT32, strict=strict),
        )
        try:
            return await worker.encoder.Encode(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            metrics.WORKER_FAILURES.labels(worker.address, error.code().name).inc()
            raise relayed(error, f"worker {worker.address} serving {model_id!r}") from None
