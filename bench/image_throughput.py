"""Image encode throughput through the gateway, each figure over a baseline measured in the same run.

For each model, starts an image worker serving only that model and a gateway without cache on free
ports (one model's processes at a time), then alternates baseline and system measurements over several
rounds and prints medians:

  base.  in-process batch-32: the worker's own backend code (decode + preprocess + model) in this
         process, on batches of 32, while the services are idle
  batch-1.  64 concurrent clients, one image per request, through the gateway / base  (target >= 0.80)
  batch-32. requests of 32 images, one client, through the gateway / base            (target >= 0.90)

and the CPU seconds the worker, the gateway and this process (the clients) used during batch-1.

Models: efficientnet-lite0 (ImageNet weights from its package) and the image tower of CLIP ViT-B-32
with random weights (speed only; its checkpoint is made in a temporary folder). Every figure uses the
same pool of distinct JPEGs (random crops of scikit-image photos, 400-600 px, quality 90), and the
gateway has no cache, so no request is answered without running the model. Figures are images per
second, each measurement about --seconds long (batch-1 then waits for the requests in flight).
Usage: python bench/image_throughput.py [--rounds N] [--seconds S] [--models ID ...]
"""

import argparse
import asyncio
import io
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
from common import CpuClock, arguments, processes, settings_under
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import types_pb2 as pb

from harness.processes import gateway, image_worker
from services.encoder.backend import EncoderBackend

BATCH = 32
CLIENTS = 64
POOL_SIZE = 64
TARGETS = {"batch-1": 0.80, "batch-32": 0.90}


def efficientnet_env(workdir: Path) -> dict[str, str]:
    return {"IMAGE_LABEL_SPACE_ENABLED": "false"}


def clip_env(workdir: Path) -> dict[str, str]:
    """CLIP ViT-B-32 with random weights (seed 0), saved as a checkpoint in `workdir`."""
    import open_clip
    import torch

    checkpoint = workdir / "ViT-B-32-random.pt"
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), checkpoint)
    return {
        "IMAGE_EFFICIENTNET_ENABLED": "false",
        "IMAGE_LABEL_SPACE_ENABLED": "false",
        "CLIP_MODEL": "ViT-B-32",
        "CLIP_CHECKPOINT": str(checkpoint),
    }


# Model id -> the worker settings that serve only that model.
MODELS: dict[str, Callable[[Path], dict[str, str]]] = {
    "efficientnet-lite0": efficientnet_env,
    "clip-ViT-B-32-image": clip_env,
}


def jpeg_pool(count: int, seed: int = 0) -> list[pb.Input]:
    """`count` distinct JPEGs (quality 90, longest side 400-600 px): random crops of four photos."""
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(photo()) for photo in (data.astronaut, data.chelsea, data.coffee, data.rocket)]
    rng = np.random.default_rng(seed)
    pool = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = (int(side * rng.uniform(0.7, 1.0)) for side in photo.size)
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        scale = int(rng.integers(400, 601)) / max(width, height)
        picture = photo.crop((left, top, left + width, top + height)).resize(
            (round(width * scale), round(height * scale)), Image.Resampling.BICUBIC
        )
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        pool.append(pb.Input(image=buffer.getvalue()))
    return pool


def batches(pool: list[pb.Input], size: int) -> Iterator[list[pb.Input]]:
    """Consecutive `size`-image slices of the pool, wrapping around, without end."""
    for start in itertools.count(0, size):
        yield [pool[(start + k) % len(pool)] for k in range(size)]


def in_process_backend(env: dict[str, str]) -> EncoderBackend:
    """The worker's backend, built from the same settings the worker gets (not loaded yet)."""
    from services.image.backends import build_backends
    from services.image.settings import ImageSettings

    (backend,) = build_backends(settings_under(ImageSettings, env))
    return backend


def in_process_rate(backend: EncoderBackend, pool: list[pb.Input], seconds: float) -> float:
    """Images/s of prepare + encode on batches of 32 (at least one batch)."""
    done = 0
    started = time.perf_counter()
    for batch in batches(pool, BATCH):
        backend.encode(backend.prepare(batch, False))
        done += len(batch)
        if time.perf_counter() - started >= seconds:
            break
    return done / (time.perf_counter() - started)


async def gateway_rate(
    stub: gateway_pb2_grpc.GatewayStub,
    model: str,
    pool: list[pb.Input],
    size: int,
    clients: int,
    seconds: float,
) -> float:
    """Images/s of `clients` concurrent clients sending `size`-image requests (each at least one)."""
    requests = batches(pool, size)
    done = 0
    started = time.perf_counter()

    async def client() -> None:
        nonlocal done
        while True:
            inputs = next(requests)
            await stub.Encode(enc.EncodeRequest(model=model, inputs=inputs), timeout=120)
            done += len(inputs)
            if time.perf_counter() - started >= seconds:
                return

    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - started)


async def measure_model(name: str, pool: list[pb.Input], args: argparse.Namespace) -> None:
    """Start the worker serving model `name` and a cache-off gateway, measure, print the model's table."""
    figures: dict[str, list[float]] = {key: [] for key in ("base", "batch-1", "batch-32")}
    cpu_seconds: dict[str, list[float]] = {key: [] for key in ("worker", "gateway", "client")}
    elapsed: list[float] = []
    with processes("image-bench-") as procs:
        env = {"IMAGE_CACHE_DIR": str(procs.data / "cache"), **MODELS[name](procs.data)}
        worker = procs.start(image_worker(env, procs.logs))
        plain = procs.start(gateway([worker.address], "", {"GATEWAY_METRICS_PORT": "0"}, procs.logs))
        backend = in_process_backend(env)
        model = backend.load().id
        print(f"{model}: worker and gateway logs in {procs.logs}", flush=True)
        async with grpc.aio.insecure_channel(plain.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            in_process_rate(backend, pool, 0)  # warm-up: one batch, one request of 32, one per client
            await gateway_rate(stub, model, pool, BATCH, 1, 0)
            await gateway_rate(stub, model, pool, 1, CLIENTS, 0)
            for round_ in range(args.rounds):
                figures["base"].append(in_process_rate(backend, pool, args.seconds))
                clock = CpuClock({"worker": [worker], "gateway": [plain]})
                started = time.perf_counter()
                figures["batch-1"].append(await gateway_rate(stub, model, pool, 1, CLIENTS, args.seconds))
                elapsed.append(time.perf_counter() - started)
                for key, seconds in clock.used().items():
                    cpu_seconds[key].append(seconds)
                figures["batch-32"].append(await gateway_rate(stub, model, pool, BATCH, 1, args.seconds))
                print(
                    f"{model} round {round_ + 1}: "
                    + ", ".join(f"{key} {values[-1]:.1f}/s" for key, values in figures.items()),
                    flush=True,
                )

    median = {key: statistics.median(values) for key, values in figures.items()}
    print(f"\n{model}: medians of {args.rounds} rounds, images/s ({os.cpu_count()} cores)")
    print(f"  {'in-process batch-32 baseline':<34}{median['base']:8.1f}")
    for key, label in (
        ("batch-1", f"gateway batch-1, {CLIENTS} clients"),
        ("batch-32", "gateway batch-32, 1 client"),
    ):
        print(
            f"  {label:<34}{median[key]:8.1f}  ratio {median[key] / median['base']:.2f} "
            f"(target >= {TARGETS[key]:.2f})"
        )
    shares = ", ".join(
        f"{key} {statistics.median(values):.1f} s "
        f"({statistics.median(s / e for s, e in zip(values, elapsed, strict=True)):.2f} cores)"
        for key, values in cpu_seconds.items()
    )
    print(f"  CPU during batch-1 ({statistics.median(elapsed):.1f} s): {shares}\n", flush=True)


async def measure(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # as the worker does
    pool = jpeg_pool(POOL_SIZE)
    for name in args.models:
        await measure_model(name, pool, args)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measurement")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to measure"
    )
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
