"""Vector search at scale through the gateway: load, memory, latency, fan-out and recall, on this machine.

Starts --shards index shards (separate processes, temporary data directories, default INDEX_* settings
but the engine: INDEX_FSYNC=always, ANN engine past INDEX_ANN_THRESHOLD=20000 items per shard) and a
gateway with no encoder workers and no cache, then, per engine:

  load.    --n random unit vectors (seeded standard normal, L2-normalised, --dim dimensions) sent as
           vectors through one Gateway.UpsertStream in requests of --batch items (default: the
           gateway's per-request limit) into space "bench-<dim>"; wall time and items/s, and the CPU
           seconds of shards, gateway and this process. A shard builds its ANN engine inside an upsert
           once it holds 20000 items and acknowledges that upsert only after, so the load time includes
           every build; when each shard switched (polled with Index.Stats) is printed too.
  memory.  each shard's VmRSS (and peak VmHWM) from /proc/<pid>/status once loaded.
  latency. --queries single searches (fresh random unit vectors, k=10), one client, one at a time:
           through the gateway (fan-out to every shard and merge) and straight to shard 0's
           Index.Search (the baseline: the same query vectors over a quarter of the data). --rounds
           rounds, the two alternating; the p50s and p99s printed are medians over the rounds, and the
           fan-out ratio is gateway p50 / direct p50. Also the CPU milliseconds per search of the shards
           (all of them) and of the gateway: with more shards than cores, fan-out waits for CPU.
  recall.  recall@10 of the gateway's hits for the first --recall-queries queries against the exact
           top 10 over all n vectors (numpy, in this process); and of shard 0's own hits against the
           exact top 10 over the items shard 0 holds.

Targets printed beside the figures: gateway p50 <= 20 ms, recall@10 >= 0.95. HNSW builds slowly (about
55 s per 250k items on 2 cores), so it is measured on the first --hnsw-n vectors only (`--engines sq8
hnsw`); on isotropic random vectors its recall is expected to be poor (real embeddings fare far better).
Its switch stalls a shard's writes past the gateway's default 5 s shard deadline, so for hnsw the gateway
gets GATEWAY_SHARD_TIMEOUT_S=120 (said in the output; --shard-timeout sets it for every engine).
The bench holds n x dim float32 (1.5 GB at the defaults) and builds upsert requests one at a time.
Usage: python bench/index_search.py [--quick] [--n N] [--shards S] [--dim D] [--engines sq8 hnsw]
       [--shard-env KEY=VALUE ...] (e.g. OMP_NUM_THREADS=1 for every shard)
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from common import (
    CpuClock,
    Rounds,
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
from embeddings.v1 import gateway_pb2_grpc, index_pb2_grpc
from embeddings.v1 import index_pb2 as idx

from harness.processes import Service, gateway, index_shard
from services.gateway.settings import GatewaySettings
from services.gateway.sharding import shard_of

K = 10
ANN_THRESHOLD = 20_000  # the shards' default INDEX_ANN_THRESHOLD
TARGET_P50_MS = 20.0
TARGET_RECALL = 0.95
# hnsw builds its graph over the first 20000 items of a shard inside one upsert: about 5 s on 2 idle
# cores, 20+ s with 4 shards switching at once, past the gateway's default 5 s deadline of a shard call.
HNSW_SHARD_TIMEOUT_S = 120.0


@dataclass
class Figures:
    engine: str
    n: int
    shards: int
    load_s: float = 0.0
    switched: list[tuple[float, int] | None] = field(default_factory=list)  # per shard: (s, items)
    load_cpu: dict[str, float] = field(default_factory=dict)
    settle_s: float = 0.0
    counts: list[int] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # per shard: (rss, peak) MiB
    gateway_rss: float = 0.0
    search: Rounds = field(default_factory=Rounds)  # paths "gateway" and "direct"; groups shards, gateway
    recall_gateway: float = 0.0
    recall_direct: float = 0.0

    @property
    def rate(self) -> float:
        return self.n / self.load_s


async def load(
    stub: gateway_pb2_grpc.GatewayStub,
    shard_stubs: list[index_pb2_grpc.IndexStub],
    space: str,
    vectors: np.ndarray,
    batch: int,
    figures: Figures,
) -> None:
    """Send every vector through UpsertStream, polling the shards' engines; fills load figures."""
    n = vectors.shape[0]
    switched: list[tuple[float, int] | None] = [None] * len(shard_stubs)
    started = time.perf_counter()

    def requests() -> Iterator[gw.UpsertRequest]:
        for start in range(0, n, batch):
            rows = vectors[start : start + batch]
            yield gw.UpsertRequest(
                space=space,
                items=[gw.UpsertItem(id=str(start + i), vector=wire(row)) for i, row in enumerate(rows)],
                request_id=str(start),
            )

    async def poll() -> None:
        while True:
            for number, shard in enumerate(shard_stubs):
                if switched[number] is not None:
                    continue
                with contextlib.suppress(grpc.aio.AioRpcError):
                    stats = await shard.Stats(idx.IndexStatsRequest(space=space), timeout=2)
                    for held in stats.spaces:
                        if held.engine != "exact":
                            switched[number] = (time.perf_counter() - started, int(held.count))
            await asyncio.sleep(0.2)

    poller = asyncio.get_running_loop().create_task(poll())
    done, next_report = 0, max(1, n // 10)
    try:
        async for response in stub.UpsertStream(requests(), timeout=24 * 3600):
            done += response.upserted
            if done >= next_report:
                elapsed = time.perf_counter() - started
                print(f"  loaded {done:>9,} items in {elapsed:6.1f} s ({done / elapsed:,.0f}/s)", flush=True)
                next_report += max(1, n // 10)
    finally:
        figures.load_s = time.perf_counter() - started
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
    if done != n:
        raise RuntimeError(f"the gateway acknowledged {done} of {n} items")
    figures.switched = switched


def wait_snapshots(data_dirs: list[Path], timeout: float = 300.0) -> float:
    """Wait while any shard is writing a snapshot (a `.tmp-*` folder); returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if not any(
            path.name.startswith(".tmp-")
            for data in data_dirs
            if (data / "snapshots").is_dir()
            for path in (data / "snapshots").iterdir()
        ):
            break
        time.sleep(0.5)
    return time.perf_counter() - started


def gateway_timeouts(engine: str, args: argparse.Namespace) -> dict[str, str]:
    """The gateway's deadline of a shard call: its default (5 s) unless --shard-timeout, or for hnsw."""
    seconds = args.shard_timeout or (HNSW_SHARD_TIMEOUT_S if engine == "hnsw" else None)
    if seconds is None:
        return {}
    # A call's deadline is min(the caller's, GATEWAY_WORKER_TIMEOUT_S, GATEWAY_SHARD_TIMEOUT_S).
    return {"GATEWAY_SHARD_TIMEOUT_S": str(seconds), "GATEWAY_WORKER_TIMEOUT_S": str(max(30.0, seconds))}


async def measure_engine(
    engine: str, vectors: np.ndarray, queries: np.ndarray, owners: np.ndarray, args: argparse.Namespace
) -> Figures:
    n, dim = vectors.shape
    figures = Figures(engine, n, args.shards)
    space = f"bench-{dim}"
    truth_queries = queries[: args.recall_queries]
    print(f"\n[{engine}] exact top-{K} of {len(truth_queries)} queries over {n:,} vectors ...", flush=True)
    truth = exact_top_k(vectors, truth_queries, K)
    local_rows = np.flatnonzero(owners[:n] == 0)
    truth_local = local_rows[exact_top_k(vectors[local_rows], truth_queries, K)]
    limit = max(GatewaySettings().max_inputs_per_request, args.batch)  # --batch may be past its default
    gateway_env = {"GATEWAY_METRICS_PORT": "0", "GATEWAY_MAX_INPUTS_PER_REQUEST": str(limit)}
    with processes(f"index-bench-{engine}-") as procs:
        data_dirs = [procs.data / f"shard{number}" for number in range(args.shards)]
        shards: list[Service] = [
            procs.start(
                index_shard(
                    data,
                    {"INDEX_ANN_ENGINE": engine, "INDEX_SHARD_NAME": f"shard{number}", **args.shard_env},
                    procs.logs,
                    name=f"index-{number}",
                )
            )
            for number, data in enumerate(data_dirs)
        ]
        router = procs.start(
            gateway(
                [],
                "",
                {**gateway_env, **gateway_timeouts(engine, args)},
                procs.logs,
                shards=[shard.address for shard in shards],
            )
        )
        print(f"[{engine}] {args.shards} shards and a gateway up; logs in {procs.logs}", flush=True)
        async with contextlib.AsyncExitStack() as channels:
            gateway_channel = await channels.enter_async_context(grpc.aio.insecure_channel(router.address))
            shard_channels = [
                await channels.enter_async_context(grpc.aio.insecure_channel(shard.address))
                for shard in shards
            ]
            stub = gateway_pb2_grpc.GatewayStub(gateway_channel)
            shard_stubs = [index_pb2_grpc.IndexStub(channel) for channel in shard_channels]

            groups = {"shards": shards, "gateway": [router]}
            clock = CpuClock(groups)
            print(f"[{engine}] loading {n:,} vectors, {args.batch} per request ...", flush=True)
            await load(stub, shard_stubs, space, vectors, args.batch, figures)
            figures.load_cpu = clock.used()
            memory = [memory_mib(shard.popen.pid) for shard in shards]  # type: ignore[union-attr]
            figures.rss = [(usage["VmRSS"], usage["VmHWM"]) for usage in memory]
            figures.gateway_rss = memory_mib(router.popen.pid)["VmRSS"]  # type: ignore[union-attr]
            for shard_stub in shard_stubs:
                stats = await shard_stub.Stats(idx.IndexStatsRequest(space=space), timeout=10)
                figures.counts.append(sum(int(held.count) for held in stats.spaces))
                figures.engines.append(",".join(held.engine for held in stats.spaces))
            if sum(figures.counts) != n:
                raise RuntimeError(f"the shards hold {figures.counts} items, not {n} in all")
            figures.settle_s = await asyncio.to_thread(wait_snapshots, data_dirs)
            print(
                f"[{engine}] loaded in {figures.load_s:.1f} s; snapshots settled {figures.settle_s:.1f} s later",
                flush=True,
            )

            gateway_requests = [
                gw.SearchRequest(vector=wire(query), space=space, k=K) for query in queries[: args.queries]
            ]
            direct_requests = [
                idx.IndexSearchRequest(space=space, query=wire(query), k=K)
                for query in queries[: args.queries]
            ]
            paths = {
                "gateway": (stub.Search, gateway_requests),
                "direct": (shard_stubs[0].Search, direct_requests),
            }
            figures.search = await alternating_rounds(paths, args.rounds, groups, 20, f"[{engine}] ")

            found_gateway, found_direct = [], []
            for gateway_request, direct_request in zip(
                gateway_requests[: args.recall_queries], direct_requests[: args.recall_queries], strict=True
            ):
                answer = await stub.Search(gateway_request, timeout=30)
                if answer.partial:
                    raise RuntimeError(f"a search missed shards {list(answer.missing_shards)}")
                found_gateway.append([int(hit.id) for hit in answer.hits])
                direct = await shard_stubs[0].Search(direct_request, timeout=30)
                found_direct.append([int(hit.id) for hit in direct.hits])
            figures.recall_gateway = recall(found_gateway, truth)
            figures.recall_direct = recall(found_direct, truth_local)
    return figures


def report(results: list[Figures], args: argparse.Namespace) -> None:
    print(f"\nindex search: dim {args.dim}, k={K}, {os.cpu_count()} cores; medians of {args.rounds} rounds")
    for figures in results:
        print(f"\n[{figures.engine}] n={figures.n:,} over {figures.shards} shards")
        for number, (switch, count, engine, (rss, peak)) in enumerate(
            zip(figures.switched, figures.counts, figures.engines, figures.rss, strict=True)
        ):
            when = f"at {switch[0]:.1f} s ({switch[1]:,} items)" if switch else "never seen"
            print(
                f"  shard{number}: {count:,} items, engine {engine}, switched to ANN {when}; "
                f"RSS {rss:,.0f} MiB (peak {peak:,.0f} MiB)"
            )
        cpu = figures.load_cpu
        print(
            f"  load CPU: shards {cpu['shards']:.0f} s, gateway {cpu['gateway']:.0f} s, client {cpu['client']:.0f} s "
            f"over {figures.load_s:.0f} s; gateway RSS {figures.gateway_rss:,.0f} MiB"
        )
        print(f"  direct-shard recall@{K} (shard0 vs exact over its own items): {figures.recall_direct:.3f}")
        for path, label in (("gateway", "gateway search"), ("direct", "direct shard0 search")):
            cpu_ms = figures.search.cpu_median(path)
            print(
                f"  CPU per {label}: shards {cpu_ms['shards']:.1f} ms, gateway {cpu_ms['gateway']:.1f} ms "
                f"(p50 latency {figures.search.median(path, 'p50'):.1f} ms)"
            )
    header = (
        f"{'n':>9} {'shards':>6} {'engine':>6} {'load s':>7} {'items/s':>8} {'RSS/shard MiB':>13} "
        f"{'gw p50':>7} {'gw p99':>7} {'dir p50':>7} {'dir p99':>7} {'fan-out':>7} {'recall@10':>9}"
    )
    print(f"\n{header}")
    for figures in results:
        search = figures.search
        gateway_p50, direct_p50 = search.median("gateway", "p50"), search.median("direct", "p50")
        print(
            f"{figures.n:>9,} {figures.shards:>6} {figures.engine:>6} {figures.load_s:>7.1f} {figures.rate:>8,.0f} "
            f"{statistics.median(rss for rss, _ in figures.rss):>13,.0f} "
            f"{gateway_p50:>7.2f} {search.median('gateway', 'p99'):>7.2f} "
            f"{direct_p50:>7.2f} {search.median('direct', 'p99'):>7.2f} "
            f"{gateway_p50 / direct_p50:>6.2f}x {figures.recall_gateway:>9.3f}"
        )
    print(
        f"{'targets':>9} {'':>6} {'':>6} {'':>7} {'':>8} {'':>13} {f'<={TARGET_P50_MS:.0f}':>7} {'':>7} "
        f"{'':>7} {'':>7} {'':>7} {f'>={TARGET_RECALL}':>9}"
    )
    for figures in results:
        p50 = figures.search.median("gateway", "p50")
        print(
            f"  {figures.engine} (n={figures.n:,}): gateway p50 {p50:.2f} ms "
            f"{'meets' if p50 <= TARGET_P50_MS else 'MISSES'} <= {TARGET_P50_MS:.0f} ms; recall@{K} "
            f"{figures.recall_gateway:.3f} {'meets' if figures.recall_gateway >= TARGET_RECALL else 'MISSES'} "
            f">= {TARGET_RECALL}"
        )
    print("  RSS/shard: median VmRSS after loading; p50/p99 in ms; fan-out = gateway p50 / direct-shard p50")


async def measure(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    largest = max(args.n if engine == "sq8" else min(args.n, args.hnsw_n) for engine in args.engines)
    print(f"generating {largest:,} x {args.dim} unit vectors (seed {args.seed}) ...", flush=True)
    vectors = unit_vectors(largest, args.dim, args.seed)
    queries = unit_vectors(max(args.queries, args.recall_queries), args.dim, args.seed + 1)
    owners = np.fromiter(
        (shard_of(str(i), args.shards) for i in range(largest)), dtype=np.int32, count=largest
    )
    if args.shard_env:
        print(f"shard environment: {args.shard_env}")
    results: list[Figures] = []
    failures: list[str] = []
    for engine in args.engines:
        n = args.n if engine == "sq8" else min(args.n, args.hnsw_n)
        if n // args.shards < ANN_THRESHOLD:
            print(
                f"note: about {n // args.shards:,} items per shard stay below the ANN threshold ({ANN_THRESHOLD:,})"
            )
        if engine == "hnsw" and n < args.n:
            print(f"note: hnsw is measured on the first {n:,} vectors only (its build is slow)", flush=True)
        timeouts = gateway_timeouts(engine, args)
        if timeouts:
            print(f"note: the gateway runs with {timeouts} for {engine} (default: 5 s per shard call)")
        try:
            results.append(await measure_engine(engine, vectors[:n], queries, owners, args))
        except (grpc.aio.AioRpcError, RuntimeError) as error:
            details = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
            print(f"[{engine}] FAILED: {details}", flush=True)
            failures.append(f"{engine} (n={n:,}): {details}")
    if results:
        report(results, args)
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=int, default=None, help="vectors to index (default 1,000,000)")
    parser.add_argument("--shards", type=int, default=4, help="index shard processes")
    parser.add_argument("--dim", type=int, default=384, help="dimensions")
    parser.add_argument(
        "--engines", nargs="+", choices=["sq8", "hnsw"], default=["sq8"], help="ANN engines, one run each"
    )
    parser.add_argument("--hnsw-n", type=int, default=200_000, help="at most this many vectors for hnsw")
    parser.add_argument(
        "--batch",
        type=int,
        default=GatewaySettings().max_inputs_per_request,
        help="items per upsert request (default: the gateway's limit, GATEWAY_MAX_INPUTS_PER_REQUEST)",
    )
    parser.add_argument("--queries", type=int, default=400, help="single searches per latency measurement")
    parser.add_argument("--recall-queries", type=int, default=200, help="queries whose recall is measured")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shard-timeout",
        type=float,
        default=None,
        help=f"GATEWAY_SHARD_TIMEOUT_S for the run (default: the gateway's 5 s; {HNSW_SHARD_TIMEOUT_S:.0f} s for hnsw)",
    )
    parser.add_argument(
        "--shard-env",
        action="append",
        type=env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of every shard, e.g. OMP_NUM_THREADS=1 (repeatable)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast check: n=100,000 (unless --n), 100 queries, 100 for recall",
    )
    args = parser.parse_args()
    args.shard_env = dict(args.shard_env)
    if args.quick:
        args.queries, args.recall_queries = 100, 100
    if args.n is None:
        args.n = 100_000 if args.quick else 1_000_000
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
