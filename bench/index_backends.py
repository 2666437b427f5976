"""The index behind the gateway, built-in shards against Milvus (Milvus Lite 2.5's C++ engine as a server):
load rate, memory, search latency and recall@10, through the gateway, on this machine.

For each --sizes N and each backend it starts the index (--shards index shards with default settings:
fsync on every write, sq8 past 20,000 items per shard; or one Milvus Lite server, GATEWAY_MILVUS_* at their
defaults: AUTOINDEX, Strong consistency, unless --milvus-env says otherwise) and a gateway with no workers
and no cache, then:

  load.    N random unit vectors (seeded standard normal, --dim dimensions) through one UpsertStream of
           --batch items per request; wall time, items/s, and the CPU seconds of the index and gateway.
  memory.  the index processes' VmRSS (and peak VmHWM) once loaded.
  latency. --queries single searches (k=10) one at a time through the gateway, --rounds rounds (the
           first 20 once, untimed); p50 and p99 are medians over the rounds.
  recall.  recall@10 of the first --recall-queries searches against the exact top 10 over all N (numpy).

Both backends run in the same run, one after the other, on the same vectors and queries, and the ratios
Milvus / shards are printed with the figures. What it says and does not say about a Milvus cluster is in
the README (Performance, Index backends): Milvus Lite is Milvus's engine in one process, not a cluster.
Usage: python bench/index_backends.py [--sizes 100000 1000000] [--backends shards milvus]
       [--milvus-env GATEWAY_MILVUS_INDEX_TYPE=IVF_FLAT ...]
"""

import argparse
import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from common import (
    CpuClock,
    alternating_rounds,
    arguments,
    env_pair,
    exact_top_k,
    memory_mib,
    processes,
    recall,
    unit_vectors,
    wire,
)
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc

from harness.processes import MilvusLite, Process, gateway, index_shard

K = 10


@dataclass
class Figures:
    backend: str
    n: int
    load_s: float = 0.0
    load_cpu: dict[str, float] = field(default_factory=dict)
    rss: list[tuple[float, float]] = field(default_factory=list)  # per index process: (rss, peak) MiB
    p50: float = 0.0
    p99: float = 0.0
    search_cpu_ms: dict[str, float] = field(default_factory=dict)
    recall: float = 0.0

    @property
    def rate(self) -> float:
        return self.n / self.load_s


async def load(stub: gateway_pb2_grpc.GatewayStub, space: str, vectors: np.ndarray, batch: int) -> None:
    n = vectors.shape[0]
    started = time.perf_counter()

    def requests() -> Iterator[gw.UpsertRequest]:
        for start in range(0, n, batch):
            rows = vectors[start : start + batch]
            yield gw.UpsertRequest(
                space=space,
                items=[gw.UpsertItem(id=str(start + i), vector=wire(row)) for i, row in enumerate(rows)],
                request_id=str(start),
            )

    done, next_report = 0, max(1, n // 5)
    async for response in stub.UpsertStream(requests(), timeout=24 * 3600):
        done += response.upserted
        if done >= next_report:
            elapsed = time.perf_counter() - started
            print(f"  loaded {done:>9,} items in {elapsed:6.1f} s ({done / elapsed:,.0f}/s)", flush=True)
            next_report += max(1, n // 5)
    if done != n:
        raise RuntimeError(f"the gateway acknowledged {done} of {n} items")


async def measure(
    backend: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> Figures:
    n, dim = vectors.shape
    figures = Figures(backend, n)
    space = f"bench-{dim}"
    env = {
        "GATEWAY_METRICS_PORT": "0",
        "GATEWAY_MAX_INPUTS_PER_REQUEST": str(args.batch),
        "GATEWAY_SHARD_TIMEOUT_S": str(args.timeout),
        "GATEWAY_WORKER_TIMEOUT_S": str(args.timeout),
    }
    with processes(f"index-backends-{backend}-") as procs:
        index: list[Process]
        if backend == "shards":
            shards = [
                procs.start(index_shard(procs.data / f"shard{n}", {}, procs.logs, name=f"index-{n}"))
                for n in range(args.shards)
            ]
            index = list(shards)
            env["GATEWAY_INDEX_SHARDS"] = ",".join(shard.address for shard in shards)
        else:  # milvus: GATEWAY_MILVUS_* defaults (and --milvus-env); milvus-flat: an exact (FLAT) index
            milvus = procs.start(MilvusLite(procs.data / "milvus", procs.logs))
            index = [milvus]
            env |= {"GATEWAY_INDEX_BACKEND": "milvus", "GATEWAY_MILVUS_URI": milvus.uri, **args.milvus_env}
            if backend == "milvus-flat":
                env["GATEWAY_MILVUS_INDEX_TYPE"] = "FLAT"
        router = procs.start(gateway([], "", env, procs.logs))
        print(f"\n[{backend} n={n:,}] up; logs in {procs.logs}", flush=True)
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            groups: dict[str, Sequence[Process]] = {"index": index, "gateway": [router]}
            clock = CpuClock(groups)
            started = time.perf_counter()
            await load(stub, space, vectors, args.batch)
            figures.load_s = time.perf_counter() - started
            figures.load_cpu = clock.used()
            usage = [memory_mib(process.popen.pid) for process in index]  # type: ignore[union-attr]
            figures.rss = [(entry["VmRSS"], entry["VmHWM"]) for entry in usage]
            cpu = ", ".join(f"{group} {seconds:.1f}" for group, seconds in figures.load_cpu.items())
            print(
                f"[{backend} n={n:,}] loaded in {figures.load_s:.1f} s ({figures.rate:,.0f}/s); CPU s: {cpu}",
                flush=True,
            )

            requests = [gw.SearchRequest(vector=wire(query), space=space, k=K) for query in queries]
            rounds = await alternating_rounds(
                {"gateway": (stub.Search, requests)}, args.rounds, groups, 20, f"[{backend} n={n:,}] "
            )
            figures.p50, figures.p99 = rounds.median("gateway", "p50"), rounds.median("gateway", "p99")
            figures.search_cpu_ms = rounds.cpu_median("gateway")
            found = []
            for request in requests[: args.recall_queries]:
                answer = await stub.Search(request, timeout=60)
                found.append([int(hit.id) for hit in answer.hits])
            figures.recall = recall(found, truth)
    return figures


def report(results: list[Figures]) -> None:
    print(
        "\nindex backends through the gateway: load, memory and search (k=10); "
        "medians of the rounds, both backends in this run"
    )
    print(
        f"{'items':>9} {'backend':>11} {'load s':>7} {'items/s':>8} {'index RSS MiB (peak)':>21} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'recall@10':>9} {'CPU ms/search index+gw':>23}"
    )
    for figures in results:
        rss = sum(rss for rss, _ in figures.rss)
        peak = sum(peak for _, peak in figures.rss)
        cpu = figures.search_cpu_ms
        print(
            f"{figures.n:>9,} {figures.backend:>11} {figures.load_s:>7.1f} {figures.rate:>8,.0f} "
            f"{rss:>10,.0f} ({peak:>7,.0f}) {figures.p50:>7.2f} {figures.p99:>7.2f} {figures.recall:>9.3f} "
            f"{cpu.get('index', 0):>11.2f} + {cpu.get('gateway', 0):.2f}"
        )
    by_size: dict[int, dict[str, Figures]] = {}
    for figures in results:
        by_size.setdefault(figures.n, {})[figures.backend] = figures
    for n, measured in sorted(by_size.items()):
        shards = measured.get("shards")
        for name, milvus in measured.items():
            if shards is not None and name != "shards":
                print(
                    f"{n:>9,}: {name} / shards: load rate {milvus.rate / shards.rate:.2f}x, "
                    f"p50 {milvus.p50 / shards.p50:.2f}x, p99 {milvus.p99 / shards.p99:.2f}x, "
                    f"recall {milvus.recall:.3f} vs {shards.recall:.3f}"
                )


async def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["shards", "milvus", "milvus-flat"],
        default=["shards", "milvus", "milvus-flat"],
    )
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--recall-queries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="GATEWAY_SHARD_TIMEOUT_S of the gateway")
    parser.add_argument("--milvus-env", type=env_pair, nargs="*", default=[])
    args = parser.parse_args()
    args.milvus_env = dict(args.milvus_env)
    results = []
    for n in args.sizes:
        vectors = unit_vectors(n, args.dim, seed=1)
        queries = unit_vectors(args.queries, args.dim, seed=2)
        truth = exact_top_k(vectors, queries[: args.recall_queries], K)
        for backend in args.backends:
            results.append(await measure(backend, vectors, queries, truth, args))
            report(results)
        del vectors


if __name__ == "__main__":
    asyncio.run(main())
