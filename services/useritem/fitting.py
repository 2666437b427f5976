"""One Fit: read the interactions (stream or file), train on the fit thread while streaming progress,
write the new version, and only then promote it to the serving one.

What a Fit changes, and when:

- Before promotion nothing changes, on disk or in memory. A Fit that fails (bad input, training that
  diverges, a disk that fails while writing) or whose caller goes away (cancels, or stays silent for
  USERITEM_FIT_IDLE_TIMEOUT_S while its stream is read) discards what it wrote and frees the worker's
  Fit slot; the version that served before it serves on, also after a restart.
- Promotion starts once training and the write are done and the caller is still there: CURRENT on disk
  is switched (the commit point, see store.py), then the serving version in memory. Once started it
  completes even if the caller leaves meanwhile (it runs shielded from the call's cancellation): the
  new version then serves although the caller may not have read the last message, which carries it.

The fit thread runs everything that touches the models on disk (training and writing, promotion,
discarding), one job after another, so the jobs of a Fit that is winding down and of the next one never
interleave.
"""

import asyncio
import contextlib
import errno
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from embeddings.v1 import recommender_pb2 as rec

from services.common.errors import Aborted, Internal, InvalidArgument, ResourceExhausted, ServiceError
from services.useritem.catalog import Catalog, check_model_name
from services.useritem.cold_items import check_content, check_content_items, with_content_map
from services.useritem.content_map import ContentBuffer
from services.useritem.ease import EaseConfig, build_ease_model, train_ease
from services.useritem.interactions import Dataset, FitRules, InteractionBuffer, read_file, resolve_fit_file
from services.useritem.model import EASE, MF, TrainedModel
from services.useritem.scale import rating_unit, scale_problem
from services.useritem.settings import UserItemSettings
from services.useritem.store import ModelStore
from services.useritem.training import EpochReport, TrainConfig, build_model, train

log = logging.getLogger("useritem.fit")

_SCALE = ("rating_min", "rating_max")
MAX_EPOCHS = 10_000


_KINDS = {rec.MODEL_KIND_MF: MF, rec.MODEL_KIND_EASE: EASE}
KIND_NUMBERS = {name: number for number, name in _KINDS.items()}


@dataclass(frozen=True)
class FitPlan:
    model: str
    implicit: bool
    scale: tuple[float, float]
    kind: str = MF
    parameters: rec.FitParameters = field(default_factory=rec.FitParameters)


class FitIdle(Aborted):
    """The caller sent nothing for USERITEM_FIT_IDLE_TIMEOUT_S while its stream was being read.

    ABORTED rather than DEADLINE_EXCEEDED: no deadline of the caller's passed (a relay or client would
    read DEADLINE_EXCEEDED as its own, and the gateway rewords a backend's DEADLINE_EXCEEDED as the worker
    not answering, the opposite of what happened); the worker gave up on a stream that stopped, and the
    remedy is ABORTED's: start the whole Fit again."""


def train_config(
    settings: UserItemSettings, implicit: bool = False, parameters: rec.FitParameters | None = None
) -> TrainConfig:
    """MF's configuration: the worker's settings, with what the Fit's parameters set instead."""
    given = parameters or rec.FitParameters()

    def pick(name: str, default: float) -> float:
        return getattr(given, name) if given.HasField(name) else default

    return TrainConfig(
        factors=int(pick("factors", settings.factors)),
        epochs=int(pick("epochs", settings.epochs)),
        batch_size=settings.batch_size,
        learning_rate=pick("learning_rate", settings.learning_rate),
        l2=pick("l2", settings.implicit_l2 if implicit else settings.l2),
        init_std=settings.init_std,
        seed=int(pick("seed", settings.seed)),
        validation_fraction=pick("validation_fraction", settings.validation_fraction),
        patience=int(pick("patience", settings.patience)),
        implicit_negatives=settings.implicit_negatives,
    )


def ease_config(settings: UserItemSettings, parameters: rec.FitParameters) -> EaseConfig:
    """EASE's configuration: the worker's settings, with what the Fit's parameters set instead."""
    return EaseConfig(
        l2=parameters.l2 if parameters.HasField("l2") else settings.ease_l2,
        validation_fraction=parameters.validation_fraction
        if parameters.HasField("validation_fraction")
        else settings.validation_fraction,
        seed=parameters.seed if parameters.HasField("seed") else settings.seed,
    )


def check_parameters(parameters: rec.FitParameters, kind: str, settings: UserItemSettings) -> None:
    """INVALID_ARGUMENT for a hyper-parameter out of its range, named as a field of the request."""
    problems = {
        "l2": parameters.HasField("l2")
        and not (
            math.isfinite(parameters.l2) and (parameters.l2 > 0 if kind == EASE else parameters.l2 >= 0)
        ),
        "factors": parameters.HasField("factors") and not 1 <= parameters.factors <= settings.factors,
        "epochs": parameters.HasField("epochs") and not 1 <= parameters.epochs <= MAX_EPOCHS,
        "learning_rate": parameters.HasField("learning_rate") and not 0 < parameters.learning_rate <= 1,
        "patience": parameters.HasField("patience") and parameters.patience < 1,
        "validation_fraction": parameters.HasField("validation_fraction")
        and not 0 <= parameters.validation_fraction < 0.5,
    }
    ranges = {
        "l2": "a finite number above 0 (EASE) or at least 0 (MF)",
        "factors": f"1 to {settings.factors} (USERITEM_FACTORS, what the worker's memory is sized for)",
        "epochs": f"1 to {MAX_EPOCHS}",
        "learning_rate": "above 0 and at most 1",
        "patience": "at least 1",
        "validation_fraction": "at least 0 and below 0.5",
    }
    for name, bad in problems.items():
        if bad:
            value = getattr(parameters, name)
            raise InvalidArgument(
                f"{value:g} is out of range: use {ranges[name]}", field=f"parameters.{name}"
            )


class Fitter:
    """Runs one Fit at a time (training takes every core); a second gets RESOURCE_EXHAUSTED."""

    def __init__(self, catalog: Catalog, store: ModelStore, settings: UserItemSettings) -> None:
        self._catalog = catalog
        self._store = store
        self._settings = settings
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fit")
        self._busy = False
        self._promotions: set[asyncio.Future[None]] = set()  # running ones, so they are not collected

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> bool:
        """A Fit is running, from its first message until its promotion is done (which goes on after a
        caller who left during it)."""
        return self._busy or bool(self._promotions)

    async def save(self, model: TrainedModel) -> None:
        """Write and promote a version that needs no Fit (FoldInItems'), on the fit thread like every
        job that touches the models on disk."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._store.save, model)

    def plan(self, first: rec.FitRequest) -> FitPlan:
        name = first.model or self._catalog.default
        check_model_name(name)
        kind: str
        if first.kind == rec.MODEL_KIND_UNSPECIFIED:
            kind = self._settings.default_kind
        elif first.kind in _KINDS:
            kind = _KINDS[first.kind]
        else:
            raise InvalidArgument(f"{first.kind} is not a ModelKind this worker knows", field="kind")
        check_parameters(first.parameters, kind, self._settings)
        return FitPlan(name, first.implicit, self._scale(first), kind, first.parameters)

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
        except FitIdle:
            raise  # a silent caller: there is nothing to read
        except ServiceError:
            # Read the rest of the stream before answering: ending the call while an asyncio client (the
            # gateway) is still writing makes that client report INTERNAL "Internal error from Core"
            # instead of this error (grpc/grpc#36066). A caller that goes silent meanwhile is left.
            with contextlib.suppress(Exception):
                while await self._next(requests) is not None:
                    pass
            raise

    async def _next(self, requests: AsyncIterator[rec.FitRequest]) -> rec.FitRequest | None:
        """The stream's next message (None at its end), within USERITEM_FIT_IDLE_TIMEOUT_S."""
        idle = self._settings.fit_idle_timeout_s
        try:
            async with asyncio.timeout(idle):
                return await anext(requests, None)
        except TimeoutError:
            raise FitIdle(
                f"no FitRequest arrived for {idle:g} s (USERITEM_FIT_IDLE_TIMEOUT_S), so the worker gave up "
                "on this Fit; it changed nothing. Send the messages without pausing and end the stream, "
                "then Fit again"
            ) from None

    async def _fit(self, requests: AsyncIterator[rec.FitRequest]) -> AsyncIterator[rec.FitProgress]:
        if self._busy:
            # Whose Fit it is, and of which model, is that caller's business.
            raise ResourceExhausted(
                "a Fit is running on this worker; one Fit runs at a time: retry when it is done"
            )
        self._busy = True
        try:
            first = await self._next(requests)
            if first is None:
                raise InvalidArgument("the Fit stream had no messages: send interactions, or a path first")
            plan = self.plan(first)
            content = ContentBuffer(self._settings.max_ids, self._settings.max_id_bytes)
            data = await self._read(first, requests, plan, content)
            async for progress in self._train(plan, data, content):
                yield progress
        finally:
            self._busy = False

    async def _read(
        self,
        first: rec.FitRequest,
        requests: AsyncIterator[rec.FitRequest],
        plan: FitPlan,
        content: ContentBuffer,
    ) -> Dataset:
        loop = asyncio.get_running_loop()
        rules = self.rules(plan)
        add_content = self._content_reader(plan, content)
        await add_content(first)
        if first.path:
            if first.interactions:
                raise InvalidArgument(
                    "the first FitRequest has both a path and interactions: send one or the other"
                )
            path = resolve_fit_file(self._settings.fit_dir, first.path)
            while (request := await self._next(requests)) is not None:
                if not request.item_content or request.interactions or _changes_plan(request, plan, first):
                    raise InvalidArgument(
                        "a Fit from a file takes one message; it had more (after the first, only messages of "
                        "item_content)"
                    )
                await add_content(request)
            return await loop.run_in_executor(self._thread, read_file, path, rules, first.path)
        buffer = InteractionBuffer(rules)
        await loop.run_in_executor(self._thread, buffer.add, first.interactions)
        number = 1
        while (request := await self._next(requests)) is not None:
            if _changes_plan(request, plan, first):
                raise InvalidArgument(
                    f"FitRequest {number} sets path, or a model, kind, parameters, implicit or rating scale "
                    "other than the first message's; only the first message sets them (later ones may "
                    "repeat them)"
                )
            await loop.run_in_executor(self._thread, buffer.add, request.interactions)
            await add_content(request)
            number += 1
        return await loop.run_in_executor(self._thread, buffer.dataset)

    def _content_reader(
        self, plan: FitPlan, content: ContentBuffer
    ) -> Callable[[rec.FitRequest], Awaitable[None]]:
        """What takes each message's item content into `content` (on the fit thread: decoding thousands of
        vectors is not for the event loop)."""
        loop = asyncio.get_running_loop()

        async def add(request: rec.FitRequest) -> None:
            if request.item_content or request.content_space:
                check_content(plan.kind)
                await loop.run_in_executor(
                    self._thread, content.add, request.item_content, request.content_space
                )

        return add

    async def _train(
        self, plan: FitPlan, data: Dataset, content: ContentBuffer
    ) -> AsyncIterator[rec.FitProgress]:
        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[EpochReport | None] = asyncio.Queue()
        cancelled = threading.Event()
        config = train_config(self._settings, plan.implicit, plan.parameters)
        unit = 1.0 if plan.implicit else rating_unit(plan.scale)
        if plan.kind == EASE and len(data.items) > self._settings.ease_max_items:
            raise InvalidArgument(
                f"the Fit has {len(data.items)} distinct items; an EASE model takes at most "
                f"{self._settings.ease_max_items} (USERITEM_EASE_MAX_ITEMS: its memory grows with the square "
                "of the item count). Fit kind MODEL_KIND_MF instead, or fewer items"
            )
        learns_map = check_content_items(content, data.items)
        log.info(
            "fit %s (%s): %d interactions (%d duplicates merged), %d users, %d items, %s",
            plan.model,
            plan.kind,
            len(data),
            data.duplicates,
            len(data.users),
            len(data.items),
            "implicit" if plan.implicit else f"ratings in [{plan.scale[0]:g}, {plan.scale[1]:g}]",
        )

        def report(epoch: EpochReport) -> None:
            log.info(
                "fit %s: epoch %d/%d loss %.4f validation rmse %.4f recall@10 %.4f ndcg@10 %.4f",
                plan.model,
                epoch.epoch,
                epoch.epochs,
                epoch.train_loss,
                epoch.validation_rmse,
                epoch.validation_recall_at_10,
                epoch.validation_ndcg_at_10,
            )
            loop.call_soon_threadsafe(reports.put_nowait, epoch)

        def run() -> TrainedModel:
            if plan.kind == EASE:
                ease = ease_config(self._settings, plan.parameters)
                matrix, weights, metrics = train_ease(
                    data, ease, plan.implicit, plan.scale, report, cancelled
                )
                model = build_ease_model(
                    plan.model, data, matrix, weights, metrics, plan.implicit, plan.scale, ease.l2
                )
            else:
                parameters, metrics = train(data, config, plan.implicit, report, cancelled, unit)
                model = build_model(
                    plan.model, data, parameters, metrics, plan.implicit, plan.scale, config.l2, unit
                )
                if learns_map:
                    model = with_content_map(model, content)
            self._store.stage(model)
            return model

        job = loop.run_in_executor(self._thread, run)
        job.add_done_callback(lambda _: reports.put_nowait(None))
        promoting = False
        try:
            while (epoch := await reports.get()) is not None:
                yield _progress(epoch, plan.kind)
            model = await job
            promoting = True  # from here on it runs to its end, whether the caller stays or not
            await self._promote(model)
        except OSError as error:  # from writing the version, or from promotion before its commit point
            raise _unsaved(error) from None
        finally:
            cancelled.set()
            if not promoting:
                await asyncio.gather(job, return_exceptions=True)
                if not job.cancelled() and job.exception() is None:
                    await loop.run_in_executor(self._thread, self._store.discard, job.result())
        metrics = model.metrics
        yield rec.FitProgress(
            epoch=metrics.epochs,
            epochs=1 if model.kind == EASE else config.epochs,
            train_loss=metrics.train_loss,
            validation_rmse=metrics.validation_rmse,
            done=True,
            model=model.card.ref(),
            interactions=len(data),
            users=len(data.users),
            items=len(data.items),
            validation_recall_at_10=metrics.validation_recall_at_10,
            validation_ndcg_at_10=metrics.validation_ndcg_at_10,
            kind=KIND_NUMBERS[model.kind],
            content_map=model.content_map.info() if model.content_map is not None else None,
        )

    async def _promote(self, model: TrainedModel) -> None:
        """CURRENT on disk, then the serving version in memory, shielded: a caller who leaves now does
        not stop it half-way (it is awaited here, so its own failure still reaches the caller)."""
        promotion = asyncio.ensure_future(self._promotion(model))
        self._promotions.add(promotion)
        promotion.add_done_callback(self._promoted)
        await asyncio.shield(promotion)

    def _promoted(self, promotion: "asyncio.Future[None]") -> None:
        self._promotions.discard(promotion)
        if not promotion.cancelled() and promotion.exception() is not None:
            # retrieved here, so that it is logged also when the caller has left and nobody awaits it
            log.error("a promotion failed before its commit point: %r", promotion.exception())

    async def _promotion(self, model: TrainedModel) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._store.promote, model)
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


def _changes_plan(request: rec.FitRequest, plan: FitPlan, first: rec.FitRequest) -> bool:
    """A later message sets something only the first may set, to another value than the first's."""
    scale = [
        request.HasField(bound) and getattr(request, bound) != value
        for bound, value in zip(_SCALE, plan.scale, strict=True)
    ]
    return bool(
        request.path
        or (request.model and request.model != plan.model)
        or (request.implicit and not plan.implicit)
        or (request.kind and request.kind != first.kind)
        or (request.HasField("parameters") and request.parameters != first.parameters)
        or any(scale)
    )


def _unsaved(error: OSError) -> ServiceError:
    """A disk failure as the caller sees it: what happened, never the worker's paths."""
    message = (
        f"the worker could not write the new version to its model directory "
        f"({error.strerror or type(error).__name__}); this Fit changed nothing. Retry once the operator "
        "has made room or fixed the disk of USERITEM_DATA_DIR"
    )
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(message)
    return Internal(message)


def _progress(epoch: EpochReport, kind: str) -> rec.FitProgress:
    return rec.FitProgress(
        epoch=epoch.epoch,
        epochs=epoch.epochs,
        train_loss=epoch.train_loss,
        validation_rmse=epoch.validation_rmse,
        validation_recall_at_10=epoch.validation_recall_at_10,
        validation_ndcg_at_10=epoch.validation_ndcg_at_10,
        kind=KIND_NUMBERS[kind],
    )
