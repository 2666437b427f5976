"""Run an encoder worker: torch threads, the Encoder servicer over the worker's backends, the server."""

import asyncio
import os
from collections.abc import Callable

import grpc
from embeddings.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.server import serve
from services.encoder.backend import EncoderBackend
from services.encoder.models import BatchLimits, LoadedModels
from services.encoder.preparing import PrepareLimits
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


def prepare_limits(settings: WorkerSettings, max_queued_cost: int, setting: str, unit: str) -> PrepareLimits:
    """How the worker admits and prepares requests: `max_queued_cost` (named `setting`, counted in `unit`),
    one preparation thread per core, chunks of 1/256 of the budget (a heavy request delays a light one by
    one such chunk at most)."""
    return PrepareLimits(
        threads=os.cpu_count() or 1,
        max_queued_cost=max_queued_cost,
        caller_share=settings.client_share,
        chunk_cost=max(1, max_queued_cost // 256),
        setting=setting,
        unit=unit,
    )


def batch_limits(settings: WorkerSettings, max_batch_tokens: int = 0) -> BatchLimits:
    """How the worker's micro-batchers batch and how many inputs may wait for them (*_MAX_QUEUE)."""
    return BatchLimits(
        settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue, max_batch_tokens
    )


def run_worker(
    name: str,
    settings: WorkerSettings,
    build_backends: Callable[[], list[EncoderBackend]],
    preparing: PrepareLimits,
    max_batch_tokens: int = 0,
) -> None:
    """Serve the backends `build_backends` makes until SIGTERM/SIGINT (models load after the port opens).

    `max_batch_tokens`: most tokens in one model batch (text workers); 0: batches are limited by count only.
    """
    configure_torch(settings)
    service = EncoderService(
        LoadedModels(name, build_backends(), batch_limits(settings, max_batch_tokens), preparing),
        settings.max_inputs_per_request,
        settings.stream_window,
    )
    asyncio.run(
        serve(
            name, settings, lambda server: [register_encoder(service, server)], service.start, service.close
        )
    )
