"""Run the user-item worker: python -m services.useritem (settings: USERITEM_* environment variables)."""

import asyncio
import logging
import sys

import grpc
from embeddings.v1 import recommender_pb2, recommender_pb2_grpc
from pydantic import ValidationError

from services.common.server import serve
from services.encoder.service import EncoderService
from services.encoder.worker import configure_torch, register_encoder
from services.useritem.catalog import Catalog
from services.useritem.encoding import TrainedVersions
from services.useritem.fitting import Fitter
from services.useritem.memory import container_memory_limit, fit_peak_bytes
from services.useritem.service import RecommenderService
from services.useritem.settings import UserItemSettings
from services.useritem.store import ModelStore

log = logging.getLogger("useritem")


def check_memory(settings: UserItemSettings) -> None:
    """Warn an operator whose limits let a Fit need more memory than the container may use."""
    limit, need = container_memory_limit(), fit_peak_bytes(settings)
    if limit is not None and need > limit:
        log.warning(
            "a Fit at USERITEM_MAX_INTERACTIONS=%d and USERITEM_MAX_IDS=%d may need %.1f GiB, more than this "
            "container's memory limit of %.1f GiB: lower them, or raise the limit (README, Limits)",
            settings.max_interactions,
            settings.max_ids,
            need / 2**30,
            limit / 2**30,
        )


def main() -> None:
    try:
        settings = UserItemSettings()
    except ValidationError as error:  # a settings error is one message, not a traceback
        sys.exit(f"useritem cannot start: {error}")
    configure_torch(settings)
    check_memory(settings)
    store = ModelStore(settings.data_dir, settings.keep_versions)
    catalog = Catalog(settings.default_model)
    fitter = Fitter(catalog, store, settings)
    recommender = RecommenderService(catalog, fitter, settings)
    encoder = EncoderService(
        TrainedVersions(catalog), settings.max_inputs_per_request, settings.stream_window
    )

    def register(server: grpc.aio.Server) -> list[str]:
        recommender_pb2_grpc.add_RecommenderServicer_to_server(recommender, server)
        return [
            recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name,
            register_encoder(encoder, server),
        ]

    async def startup() -> None:
        loaded = await asyncio.get_running_loop().run_in_executor(None, store.load_all)
        for model in loaded.values():
            catalog.put(model)
            log.info("loaded model %s version %s (%s)", model.name, model.version, model.card.description)
        if not loaded:
            log.info("no trained model in %s yet: call Fit", settings.data_dir)

    async def shutdown() -> None:
        fitter.close()
        recommender.close()

    asyncio.run(serve("useritem", settings, register, startup, shutdown))


if __name__ == "__main__":
    main()
