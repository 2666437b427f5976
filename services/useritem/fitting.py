"""One Fit: read the interactions (stream or file), train on the fit thread while streaming progress,
save the new version, and only then make it the serving one."""

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from embeddings.v1 import recommender_pb2 as rec

from services.common.errors import InvalidArgument, ResourceExhausted, ServiceError
from services.useritem.catalog import Catalog, check_model_name
from services.useritem.interactions import Dataset, FitRules, InteractionBuffer, read_file, resolve_fit_file
from services.useritem.model import TrainedModel
from services.useritem.scale import rating_unit, scale_problem
from services.useritem.settings import UserItemSettings
from services.useritem.store import ModelStore
from services.useritem.training import EpochReport, TrainConfig, build_model, train

log = logging.getLogger("useritem.fit")

_SCALE = ("rating_min", "rating_max")


@dataclass(frozen=True)
class FitPlan:
    model: str
    implicit: bool
    scale: tuple[float, float]


def train_config(settings: UserItemSettings, implicit: bool = False) -> TrainConfig:
    return TrainConfig(
        factors=settings.factors,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        l2=settings.implicit_l2 if implicit else settings.l2,
        init_std=settings.init_std,
        seed=settings.seed,
        validation_fraction=settings.validation_fraction,
        patience=settings.patience,
        implicit_negatives=settings.implicit_negatives,
    )


class Fitter:
    """Runs one Fit at a time (training takes every core); a second gets RESOURCE_EXHAUSTED."""

    def __init__(self, catalog: Catalog, store: ModelStore, settings: UserItemSettings) -> None:
        self._catalog = catalog
        self._store = store
        self._settings = settings
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fit")
        self._busy: str | None = None

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def plan(self, first: rec.FitRequest) -> FitPlan:
        name = first.model or self._catalog.default
        check_model_name(name)
        return FitPlan(name, first.implicit, self._scale(first))

    def _scale(self, first: rec.FitRequest) -> tuple[float, float]:
        """The declared scale (both bounds set, presence on the wire), or the worker's default (neither)."""
        declared = [first.HasField(bound) for bound in _SCALE]
        if not any(declared):
            return (self._settings.rating_min, self._settings.rating_max)
        if not all(declared):
            given, missing = _SCALE if declared[0] else _SCALE[::-1]
            raise InvalidArgument(
                f"{given} is set without {missing}: declare both bounds of the rating scale, or neither for "
                f"the worker's default [{self._settings.rating_min:g}, {self._settings.rating_max:g}] (a "
                "client built from an older recommender.proto does not send a bound of 0: rebuild it)"
            )
        scale = (first.rating_min, first.rating_max)
        problem = scale_problem(*scale)
        if problem is not None:
            raise InvalidArgument(f"rating scale [{scale[0]:g}, {scale[1]:g}] is not valid: {problem}")
        return scale

    def rules(self, plan: FitPlan) -> FitRules:
        return FitRules(
            implicit=plan.implicit,
            rating_min=plan.scale[0],
            rating_max=plan.scale[1],
            min_interactions=self._settings.min_interactions,
            max_interactions=self._settings.max_interactions,
            max_id_bytes=self._settings.max_id_bytes,
            max_ids=self._settings.max_ids,
        )

    async def fit(self, requests: AsyncIterator[rec.FitRequest]) -> AsyncIterator[rec.FitProgress]:
        try:
            async for progress in self._fit(requests):
                yield progress
        except ServiceError:
            # Read the rest of the stream before answering: ending the call while an asyncio client (the
            # gateway) is still writing makes that client report INTERNAL "Internal error from Core"
            # instead of this error (grpc/grpc#36066).
            with contextlib.suppress(Exception):
                async for _ in requests:
                    pass
            raise

    async def _fit(self, requests: AsyncIterator[rec.FitRequest]) -> AsyncIterator[rec.FitProgress]:
        if self._busy is not None:
            raise ResourceExhausted(
                f"a Fit of model {self._busy!r} is running; one Fit runs at a time: retry when it is done"
            )
        self._busy = "(reading)"
        try:
            first = await anext(requests, None)
            if first is None:
                raise InvalidArgument("the Fit stream had no messages: send interactions, or a path first")
            plan = self.plan(first)
            self._busy = plan.model
            data = await self._read(first, requests, plan)
            async for progress in self._train(plan, data):
                yield progress
        finally:
            self._busy = None

    async def _read(
        self, first: rec.FitRequest, requests: AsyncIterator[rec.FitRequest], plan: FitPlan
    ) -> Dataset:
        loop = asyncio.get_running_loop()
        rules = self.rules(plan)
        if first.path:
            if first.interactions:
                raise InvalidArgument(
                    "the first FitRequest has both a path and interactions: send one or the other"
                )
            path = resolve_fit_file(self._settings.fit_dir, first.path)
            if await anext(requests, None) is not None:
                raise InvalidArgument("a Fit from a file takes one message; it had more")
            return await loop.run_in_executor(self._thread, read_file, path, rules, first.path)
        buffer = InteractionBuffer(rules)
        await loop.run_in_executor(self._thread, buffer.add, first.interactions)
        number = 1
        while (request := await anext(requests, None)) is not None:
            if _changes_plan(request, plan):
                raise InvalidArgument(
                    f"FitRequest {number} sets path, or a model, implicit or rating scale other than the "
                    "first message's; only the first message sets them (later ones may repeat them)"
                )
            await loop.run_in_executor(self._thread, buffer.add, request.interactions)
            number += 1
        return await loop.run_in_executor(self._thread, buffer.dataset)

    async def _train(self, plan: FitPlan, data: Dataset) -> AsyncIterator[rec.FitProgress]:
        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[EpochReport | None] = asyncio.Queue()
        cancelled = threading.Event()
        config = train_config(self._settings, plan.implicit)
        unit = 1.0 if plan.implicit else rating_unit(plan.scale)
        log.info(
            "fit %s: %d interactions (%d duplicates merged), %d users, %d items, %s",
            plan.model,
            len(data),
            data.duplicates,
            len(data.users),
            len(data.items),
            "implicit" if plan.implicit else f"ratings in [{plan.scale[0]:g}, {plan.scale[1]:g}]",
        )

        def report(epoch: EpochReport) -> None:
            log.info(
                "fit %s: epoch %d/%d loss %.4f validation rmse %.4f recall@10 %.4f",
                plan.model,
                epoch.epoch,
                epoch.epochs,
                epoch.train_loss,
                epoch.validation_rmse,
                epoch.validation_recall_at_10,
            )
            loop.call_soon_threadsafe(reports.put_nowait, epoch)

        def run() -> TrainedModel:
            parameters, metrics = train(data, config, plan.implicit, report, cancelled, unit)
            model = build_model(
                plan.model, data, parameters, metrics, plan.implicit, plan.scale, config.l2, unit
            )
            self._store.save(model)
            return model

        job = loop.run_in_executor(self._thread, run)
        job.add_done_callback(lambda _: reports.put_nowait(None))
        try:
            while (epoch := await reports.get()) is not None:
                yield _progress(epoch)
            model = await job
        finally:
            cancelled.set()
            await asyncio.gather(job, return_exceptions=True)
        self._catalog.put(model)
        metrics = model.metrics
        log.info(
            "fit %s: version %s serving (epoch %d, validation rmse %.4f, recall@10 %.4f, %.1fs)",
            model.name,
            model.version,
            metrics.epochs,
            metrics.validation_rmse,
            metrics.validation_recall_at_10,
            metrics.train_seconds,
        )
        yield rec.FitProgress(
            epoch=metrics.epochs,
            epochs=config.epochs,
            train_loss=metrics.train_loss,
            validation_rmse=metrics.validation_rmse,
            done=True,
            model=model.card.ref(),
            interactions=len(data),
            users=len(data.users),
            items=len(data.items),
            validation_recall_at_10=metrics.validation_recall_at_10,
        )


def _changes_plan(request: rec.FitRequest, plan: FitPlan) -> bool:
    """A later message sets something only the first may set, to another value than the first's."""
    scale = [
        request.HasField(bound) and getattr(request, bound) != value
        for bound, value in zip(_SCALE, plan.scale, strict=True)
    ]
    return bool(
        request.path
        or (request.model and request.model != plan.model)
        or (request.implicit and not plan.implicit)
        or any(scale)
    )


def _progress(epoch: EpochReport) -> rec.FitProgress:
    return rec.FitProgress(
        epoch=epoch.epoch,
        epochs=epoch.epochs,
        train_loss=epoch.train_loss,
        validation_rmse=epoch.validation_rmse,
        validation_recall_at_10=epoch.validation_recall_at_10,
    )
