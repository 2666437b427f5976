"""Run an encoder worker: torch threads, the Encoder servicer over the worker's backends, the server."""

import asyncio
import os
from collections.abc import Callable

import grpc
from embeddings.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.server import serve
from services.encoder.backend import EncoderBackend
from services.encoder.models import BatchLimits, LoadedModels
from services.encoder.service import EncoderService
from services.encoder.settings import EncoderSettings, WorkerSettings


def configure_torch(settings: EncoderSettings) -> None:
    """Offline model loading, and torch's intra-op threads as the settings ask (0: one per core)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)


def register_encoder(service: EncoderService, server: grpc.aio.Server) -> str:
    """Add the Encoder servicer to `server`; returns its full service name (for health and reflection)."""
    encoder_pb2_grpc.add_EncoderServicer_to_server(service, server)
    return str(encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name)


def run_worker(
    name: str, settings: WorkerSettings, build_backends: Callable[[], list[EncoderBackend]]
) -> None:
    """Serve the backends `build_backends` makes until SIGTERM/SIGINT (models load after the port opens)."""
    configure_torch(settings)
    limits = BatchLimits(settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue)
    service = EncoderService(
        LoadedModels(build_backends(), limits), settings.max_inputs_per_request, settings.stream_window
    )
    asyncio.run(
        serve(
            name, settings, lambda server: [register_encoder(service, server)], service.start, service.close
        )
    )
