"""Run an encoder worker: torch threads, the Encoder servicer over the worker's backends, the server."""

import asyncio
import os
from collections.abc import Callable

import grpc
from embeddings.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.backend import EncoderBackend
from services.common.encoder_service import BatchLimits, EncoderService
from services.common.server import serve
from services.common.settings import WorkerSettings


def batch_limits(settings: WorkerSettings) -> BatchLimits:
    return BatchLimits(
        max_inputs_per_request=settings.max_inputs_per_request,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        stream_window=settings.stream_window,
    )


def run_worker(
    name: str, settings: WorkerSettings, build_backends: Callable[[], list[EncoderBackend]]
) -> None:
    """Serve the backends `build_backends` makes until SIGTERM/SIGINT (models load after the port opens)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
    service = EncoderService(build_backends(), batch_limits(settings))

    def register(server: grpc.aio.Server) -> list[str]:
        encoder_pb2_grpc.add_EncoderServicer_to_server(service, server)
        return [encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name]

    asyncio.run(serve(name, settings, register, service.start, service.close))
