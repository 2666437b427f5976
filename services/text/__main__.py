"""Run the text worker: python -m services.text (settings: TEXT_* and CLIP_* environment variables)."""

import asyncio
import os

import grpc
from embeddings.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.encoder_service import BatchLimits, EncoderService
from services.common.server import serve
from services.text.backends import build_backends
from services.text.settings import TextSettings


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = TextSettings()
    import torch

    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
    service = EncoderService(
        build_backends(settings),
        BatchLimits(
            max_inputs_per_request=settings.max_inputs_per_request,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            stream_window=settings.stream_window,
        ),
    )

    def register(server: grpc.aio.Server) -> list[str]:
        encoder_pb2_grpc.add_EncoderServicer_to_server(service, server)
        return [encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name]

    asyncio.run(serve("text", settings, register, service.start, service.close))


if __name__ == "__main__":
    main()
