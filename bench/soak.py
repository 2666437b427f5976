"""Soak: mixed encode, search and recommend load through the gateway at a fixed rate, for a long time.

Not run in CI. Starts its own system on free loopback ports, its data in a temporary directory: redis,
a text worker, an image worker (the label space's prompt embeddings come from the usual
IMAGE_CACHE_DIR), two index shards, a user-item worker and a gateway, each with its default settings
but those given with --env (every service gets them; each reads its own prefix, e.g. TEXT_).
Then, through the gateway:

  data.     upserts --captions generated captions and five scikit-image sample photos into the
            `minilm` space (texts by MiniLM, photos by the label space), and Fits the model "soak" on
            synthetic ratings: --users users x --items items, 40 ratings a user from planted rank-8
            factors plus biases and noise, on the 0.5..5 scale (seeded; nothing from the network).
  warm-up.  encodes the pools of repeated texts and images (so a repeat is a cache hit from the start)
            and makes a few calls of every kind. RSS and CPU seconds are taken after it: "start".
  load.     an open loop: call i is due at i / --rate seconds and is issued then, whatever the calls
            before it are doing, so a slow answer does not slow the schedule. A call that the client
            itself starts more than 50 ms behind its slot counts as late. Kinds are drawn by --mix:
              encode_text   Encode of one text: half from a pool of repeats (cache hits), half new
              encode_image  Encode of one JPEG (efficientnet-lite0): half from a pool of crops of the
                            photos (cache hits), half a new random crop (made in a thread before the
                            call's clock starts)
              search        Search by a text drawn like encode_text's, k=10, in `minilm`
              recommend     Recommend (model "soak", k=10) for a random known user
            Every call has --deadline-s. An OK answer that is partial (shards missing) or has fewer
            than k hits counts as an error too. Every --sample-s the RSS of every process is sampled
            and a progress line printed (with each kind's p99 since the line before).

Prints per call kind the count, errors by status code and p50/p99/max latency of the OK calls; the
achieved rate; each process's RSS (VmRSS) at start and end and its CPU seconds during the load; and the
RSS samples as a table, so a leak shows as a trend. If a service exits during the load, the load stops
there and the report names it. Ctrl-C stops the load, prints what was measured so far (the services get
the terminal's SIGINT too, so their end RSS may be gone) and stops every process.

Usage: python bench/soak.py [--duration-s S] [--rate R] [--mix encode_text=4,encode_image=1,...]
       [--deadline-s D] [--sample-s S] [--seed N] [--captions N] [--users N] [--items N]
       [--env KEY=VALUE ...] [--json PATH]
"""

import argparse
import asyncio
import io
import json
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from common import CpuClock, arguments, env_pair, memory_mib, percentiles, processes, settings_under
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import gateway_pb2 as gw
from embeddings.v1 import gateway_pb2_grpc
from embeddings.v1 import recommender_pb2 as rec
from embeddings.v1 import types_pb2 as pb
from PIL import Image

from harness.processes import (
    Process,
    RedisServer,
    gateway,
    image_worker,
    index_shard,
    text_worker,
    useritem_worker,
)
from services.gateway.settings import GatewaySettings

K = 10
KINDS = ("encode_text", "encode_image", "search", "recommend")
DEFAULT_MIX = "encode_text=4,encode_image=1,search=3,recommend=2"
MODEL = "soak"
SPACE = "minilm"
LATE_S = 0.05  # a call started this far behind its slot is late: the client, not the system, fell behind
REPEAT_SHARE = 0.5  # share of texts and images drawn from the pools warmed into the cache
TEXT_POOL = 200
IMAGE_POOL = 16
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
RANK = 8
RATINGS_PER_USER = 40
FIT_CHUNK = 5000
WARMUP_CALLS = 3  # of each kind

ADJECTIVES = (
    "red quiet small old bright wooden busy frozen golden empty tall noisy green sleepy rusty crowded "
    "gentle broken shiny distant"
).split()
NOUNS = (
    "cat harbour rocket espresso bicycle market mountain dog train garden lighthouse kitchen horse bridge "
    "library river astronaut violin forest street"
).split()
VERBS = (
    "sits beside,runs towards,waits near,rests under,looks at,stands behind,drifts past,leans against,"
    "sleeps on,glows above"
).split(",")


def sentence(rng: random.Random) -> str:
    """A short caption-like sentence from the vocabulary (about 10^9 distinct ones)."""
    return (
        f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
        f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} at {rng.randrange(1, 1000)} o'clock"
    )


def jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def crop(pictures: list[Image.Image], seed: int) -> bytes:
    """A random crop (60-100% of each side) of one of `pictures`, scaled to 224-400 px, as a JPEG."""
    rng = random.Random(seed)
    picture = rng.choice(pictures)
    width, height = (int(side * rng.uniform(0.6, 1.0)) for side in picture.size)
    left, top = rng.randrange(picture.width - width + 1), rng.randrange(picture.height - height + 1)
    scale = rng.randrange(224, 401) / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return jpeg(picture.crop((left, top, left + width, top + height)).resize(size))


def synthetic_ratings(users: int, items: int, seed: int) -> list[rec.Interaction]:
    """RATINGS_PER_USER ratings a user: 3.5 + biases + planted factors + noise, rounded to halves, clipped."""
    rng = np.random.default_rng(seed)
    user_factors = rng.normal(0.0, 1.0 / np.sqrt(RANK), (users, RANK))
    item_factors = rng.normal(0.0, 1.0 / np.sqrt(RANK), (items, RANK))
    user_bias, item_bias = rng.normal(0.0, 0.3, users), rng.normal(0.0, 0.5, items)
    out: list[rec.Interaction] = []
    for user in range(users):
        rated = rng.choice(items, size=min(RATINGS_PER_USER, items), replace=False)
        scores = 3.5 + user_bias[user] + item_bias[rated] + item_factors[rated] @ user_factors[user]
        ratings = np.clip(np.round((scores + rng.normal(0.0, 0.3, len(rated))) * 2) / 2, 0.5, 5.0)
        out.extend(
            rec.Interaction(user_id=f"u{user}", item_id=f"i{item}", rating=float(rating))
            for item, rating in zip(rated.tolist(), ratings.tolist(), strict=True)
        )
    return out


def parse_mix(text: str) -> dict[str, float]:
    """`encode_text=4,search=3` -> a weight per kind (kinds left out get 0)."""
    mix = dict.fromkeys(KINDS, 0.0)
    for part in text.split(","):
        kind, _, weight = (value.strip() for value in part.partition("="))
        if kind not in mix:
            raise argparse.ArgumentTypeError(f"unknown call kind {kind!r}; kinds: {', '.join(KINDS)}")
        mix[kind] = float(weight)
    if any(weight < 0 for weight in mix.values()) or sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("weights must be >= 0 and at least one > 0")
    return mix


@dataclass
class KindStats:
    latencies_ms: list[float] = field(default_factory=list)  # OK calls only
    errors: Counter[str] = field(default_factory=Counter)
    cached: int = 0  # OK encode calls answered from the cache

    @property
    def count(self) -> int:
        return len(self.latencies_ms) + self.error_count

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, object]:
        """Counts and latency percentiles (None without OK calls)."""
        times = self.latencies_ms
        latency = percentiles(times) if times else dict.fromkeys(("p50", "p99"))
        return {
            "count": self.count,
            "ok": len(times),
            "errors": dict(self.errors),
            **{f"{key}_ms": value for key, value in latency.items()},
            "max_ms": max(times) if times else None,
            "cached": self.cached,
        }


@dataclass
class Sample:
    elapsed_s: float
    issued: int
    completed: int
    errors: int
    rss_mib: dict[str, float | None]
    p99_ms: dict[str, float | None]  # per kind, of the OK calls answered since the previous sample


@dataclass
class Run:
    """What the load measured."""

    stats: dict[str, KindStats] = field(default_factory=lambda: {kind: KindStats() for kind in KINDS})
    issued: int = 0
    late: int = 0
    max_lag_ms: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    load_s: float = 0.0  # from the first slot until the last answer
    interrupted: bool = False
    exited: dict[str, str] = field(default_factory=dict)  # process -> exit code and log, if one exited
    samples: list[Sample] = field(default_factory=list)
    sampled_ok: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))  # OK calls sampled
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, during the load

    @property
    def completed(self) -> int:
        return sum(stats.count for stats in self.stats.values())

    @property
    def errors(self) -> int:
        return sum(stats.error_count for stats in self.stats.values())


class Inputs:
    """What the calls send: repeats from pools warmed into the cache, or inputs never sent before."""

    def __init__(self, seed: int, users: int, pictures: list[Image.Image]) -> None:
        self.rng = random.Random(seed)
        self.users = users
        self.pictures = pictures
        self.text_pool = [sentence(self.rng) for _ in range(TEXT_POOL)]
        self.image_pool = [crop(pictures, self.rng.getrandbits(64)) for _ in range(IMAGE_POOL)]

    def text(self) -> str:
        if self.rng.random() < REPEAT_SHARE:
            return self.rng.choice(self.text_pool)
        return sentence(self.rng)

    async def image(self) -> bytes:
        if self.rng.random() < REPEAT_SHARE:
            return self.rng.choice(self.image_pool)
        # Off the event loop: encoding a JPEG here would delay the answers of the calls in flight.
        return await asyncio.to_thread(crop, self.pictures, self.rng.getrandbits(64))

    def user(self) -> str:
        return f"u{self.rng.randrange(self.users)}"


def bad_answer(response: object) -> str | None:
    """Why an OK answer is not a good one (as an error label), or None."""
    if isinstance(response, enc.EncodeResponse):
        return None if len(response.embeddings) == 1 and response.embeddings[0].vector.data else "EMPTY"
    if isinstance(response, gw.SearchResponse):
        if response.partial:
            return "PARTIAL"
        return None if len(response.hits) == K else "SHORT"
    assert isinstance(response, rec.RecommendResponse)
    return None if len(response.items) == K else "SHORT"


class Caller:
    """Builds and makes one call of a kind through the gateway, and records how it went."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayStub, inputs: Inputs, deadline_s: float) -> None:
        self.stub = stub
        self.inputs = inputs
        self.deadline_s = deadline_s

    async def request(self, kind: str) -> tuple[Callable[..., Awaitable[object]], object]:
        if kind == "encode_text":
            return self.stub.Encode, enc.EncodeRequest(inputs=[pb.Input(text=self.inputs.text())])
        if kind == "encode_image":
            image = await self.inputs.image()
            return self.stub.Encode, enc.EncodeRequest(inputs=[pb.Input(image=image)])
        if kind == "search":
            return self.stub.Search, gw.SearchRequest(input=pb.Input(text=self.inputs.text()), k=K)
        return self.stub.Recommend, rec.RecommendRequest(model=MODEL, user_id=self.inputs.user(), k=K)

    async def call(self, kind: str, stats: KindStats | None = None) -> None:
        """One call, recorded in `stats`; without `stats` (warm-up) any failure raises."""
        method, request = await self.request(kind)
        started = time.perf_counter()
        try:
            response = await method(request, timeout=self.deadline_s)
        except grpc.aio.AioRpcError as error:
            if stats is None:
                raise
            stats.errors[error.code().name] += 1
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        problem = bad_answer(response)
        if stats is None:
            if problem:
                raise RuntimeError(f"warm-up {kind}: {problem} answer: {response}")
        elif problem:
            stats.errors[problem] += 1
        else:
            stats.latencies_ms.append(elapsed_ms)
            stats.cached += int(isinstance(response, enc.EncodeResponse) and response.embeddings[0].cached)


async def prepare(stub: gateway_pb2_grpc.GatewayStub, inputs: Inputs, args: argparse.Namespace) -> None:
    """Index captions and photos, Fit the user-item model, warm the cache and every call path."""
    started = time.perf_counter()
    rng = random.Random(args.seed + 1)
    captions = [
        gw.UpsertItem(id=f"caption-{number}", input=pb.Input(text=sentence(rng)))
        for number in range(args.captions)
    ]
    limit = settings_under(GatewaySettings, args.env).max_inputs_per_request
    for start in range(0, len(captions), limit):
        request = gw.UpsertRequest(space=SPACE, items=captions[start : start + limit])
        await stub.Upsert(request, timeout=300)
    pictures = [
        gw.UpsertItem(id=f"photo-{name}", input=pb.Input(image=jpeg(picture)))
        for name, picture in zip(PHOTOS, inputs.pictures, strict=True)
    ]
    await stub.Upsert(gw.UpsertRequest(space=SPACE, items=pictures), timeout=300)
    print(
        f"indexed {len(captions)} captions and {len(pictures)} photos in {time.perf_counter() - started:.1f} s",
        flush=True,
    )

    started = time.perf_counter()
    ratings = synthetic_ratings(args.users, args.items, args.seed)
    requests = [
        rec.FitRequest(interactions=ratings[start : start + FIT_CHUNK])
        for start in range(0, len(ratings), FIT_CHUNK)
    ]
    requests[0].model = MODEL  # the first message only names the model
    done: rec.FitProgress | None = None
    async for progress in stub.Fit(iter(requests), timeout=600):
        if progress.done:
            done = progress
    if done is None:
        raise RuntimeError("the Fit stream ended without its final (done) message")
    print(
        f"fitted {done.model.id} version {done.model.version}: {done.interactions:,} ratings, {done.users} "
        f"users, {done.items} items, validation RMSE {done.validation_rmse:.3f} (epoch {done.epoch}), in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )

    started = time.perf_counter()
    for pool in (
        [pb.Input(text=text) for text in inputs.text_pool],
        [pb.Input(image=image) for image in inputs.image_pool],
    ):
        await stub.Encode(enc.EncodeRequest(inputs=pool), timeout=300)
    caller = Caller(stub, inputs, args.deadline_s)
    for kind in KINDS:
        for _ in range(WARMUP_CALLS):
            await caller.call(kind)
    print(f"warmed up the cache and every call kind in {time.perf_counter() - started:.1f} s", flush=True)


def take_sample(pids: dict[str, int], run: Run, started: float) -> Sample:
    recent = {kind: stats.latencies_ms[run.sampled_ok[kind] :] for kind, stats in run.stats.items()}
    run.sampled_ok = {kind: len(stats.latencies_ms) for kind, stats in run.stats.items()}
    sample = Sample(
        elapsed_s=time.monotonic() - started,
        issued=run.issued,
        completed=run.completed,
        errors=run.errors,
        rss_mib={name: memory_mib(pid).get("VmRSS") for name, pid in pids.items()},
        p99_ms={kind: percentiles(times)["p99"] if times else None for kind, times in recent.items()},
    )
    run.samples.append(sample)
    return sample


def mib(value: float | None) -> str:
    return "gone" if value is None else f"{value:.1f}"


async def drive(caller: Caller, services: dict[str, Process], run: Run, args: argparse.Namespace) -> None:
    """The open loop: call i is issued at its slot i / rate, concurrently with the calls before it.

    Stops issuing once a service has exited: every later call would only fail the same way."""
    pids = {name: process.popen.pid for name, process in services.items() if process.popen}
    pids["client"] = os.getpid()
    rng = random.Random(args.seed + 2)
    kinds, weights = list(args.mix), list(args.mix.values())
    total = round(args.duration_s * args.rate)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def one(kind: str) -> None:
        run.in_flight += 1
        run.max_in_flight = max(run.max_in_flight, run.in_flight)
        try:
            await caller.call(kind, run.stats[kind])
        finally:
            run.in_flight -= 1

    async def report_progress(started: float) -> None:
        while True:
            await asyncio.sleep(args.sample_s)
            sample = take_sample(pids, run, started)
            rss = ", ".join(f"{name} {mib(value)}" for name, value in sample.rss_mib.items())
            p99 = ", ".join(
                f"{kind} {'-' if value is None else f'{value:.0f}'}" for kind, value in sample.p99_ms.items()
            )
            print(
                f"[{sample.elapsed_s:5.0f} s] issued {sample.issued}, answered {sample.completed}, errors "
                f"{sample.errors}, in flight {run.in_flight}, late {run.late}; p99 ms since the last line: "
                f"{p99}; RSS MiB: {rss}",
                flush=True,
            )

    started = time.monotonic()
    take_sample(pids, run, started)
    progress = loop.create_task(report_progress(started))
    first = loop.time()
    try:
        for number in range(total):
            due = first + number / args.rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            run.exited = {
                name: f"exit code {process.popen.returncode}, log {process.log_path}"
                for name, process in services.items()
                if process.popen and not process.running()
            }
            if run.exited:
                break
            lag = loop.time() - due
            run.max_lag_ms = max(run.max_lag_ms, lag * 1000)
            run.late += int(lag > LATE_S)
            task = loop.create_task(one(rng.choices(kinds, weights)[0]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            run.issued += 1
        await asyncio.gather(*tasks)
    finally:
        run.load_s = loop.time() - first
        for task in [*tasks, progress]:
            task.cancel()
        await asyncio.gather(*tasks, progress, return_exceptions=True)
        take_sample(pids, run, started)


def report(run: Run, args: argparse.Namespace) -> None:
    mix = ",".join(f"{kind}={weight:g}" for kind, weight in args.mix.items())
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"\nsoak: {args.duration_s:g} s planned at {args.rate:g} calls/s ({round(args.duration_s * args.rate)} "
        f"calls), mix {mix}, deadline {args.deadline_s:g} s; {os.cpu_count()} cores, load average now {load}"
        + ("\nINTERRUPTED (Ctrl-C): the figures so far" if run.interrupted else "")
    )
    for name, why in run.exited.items():
        print(f"STOPPED EARLY: {name} exited during the load ({why})")
    completed = run.completed
    print(
        f"achieved: {run.issued} calls issued, {completed} answered in {run.load_s:.1f} s "
        f"({completed / run.load_s if run.load_s else 0.0:.2f} calls/s); started late (> {LATE_S * 1000:.0f} ms "
        f"behind the timetable): {run.late}, largest start lag {run.max_lag_ms:.1f} ms; most calls in flight "
        f"{run.max_in_flight}"
    )

    def ms(value: object) -> str:
        return f"{value:.1f}" if isinstance(value, float) else "-"

    print(
        f"\n{'call':<13} {'count':>6} {'ok':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  notes"
    )
    for kind, stats in run.stats.items():
        summary = stats.summary()
        notes = []
        if kind.startswith("encode") and stats.latencies_ms:
            notes.append(f"cache hits {stats.cached / len(stats.latencies_ms):.0%}")
        notes += [f"{code} {count}" for code, count in stats.errors.most_common()]
        print(
            f"{kind:<13} {stats.count:>6} {len(stats.latencies_ms):>6} {stats.error_count:>6} "
            f"{ms(summary['p50_ms']):>8} {ms(summary['p99_ms']):>8} {ms(summary['max_ms']):>8}  {', '.join(notes)}"
        )
    print(f"total errors: {run.errors} of {completed} calls (latencies are of the OK calls)")

    first, last = run.samples[0], run.samples[-1]
    print(
        f"\n{'process':<9} {'RSS start MiB':>13} {'RSS end MiB':>11} {'change':>8} {'CPU s':>7} {'cores':>6}"
    )
    for name, start in first.rss_mib.items():
        end = last.rss_mib[name]
        change = f"{end - start:+.1f}" if end is not None and start is not None else "-"
        cpu = run.cpu_s.get(name)
        cpu_text = f"{cpu:>7.1f} {cpu / run.load_s:>6.2f}" if cpu is not None and run.load_s else ""
        print(f"{name:<9} {mib(start):>13} {mib(end):>11} {change:>8} {cpu_text}")
    print(
        "(CPU s: used during the load; cores: CPU s / load seconds; client: this process, the load generator)"
    )

    names = list(first.rss_mib)
    print(f"\nRSS samples, MiB (every {args.sample_s:g} s, and at the end)")
    print(f"{'t s':>6} {'answered':>8} {'errors':>6} " + " ".join(f"{name:>8}" for name in names))
    for sample in run.samples:
        rss = " ".join(f"{mib(sample.rss_mib[name]):>8}" for name in names)
        print(f"{sample.elapsed_s:>6.0f} {sample.completed:>8} {sample.errors:>6} {rss}")

    if args.json:
        results = {
            "settings": {**vars(args), "json": str(args.json)},
            "issued": run.issued,
            "completed": completed,
            "load_s": run.load_s,
            "late": run.late,
            "max_lag_ms": run.max_lag_ms,
            "max_in_flight": run.max_in_flight,
            "interrupted": run.interrupted,
            "exited": run.exited,
            "errors": run.errors,
            "calls": {kind: stats.summary() for kind, stats in run.stats.items()},
            "cpu_s": run.cpu_s,
            "samples": [asdict(sample) for sample in run.samples],
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


async def soak(args: argparse.Namespace) -> None:
    with processes("soak-") as procs:
        data, logs = procs.data, procs.logs
        print(
            f"starting redis, 2 encoder workers, 2 index shards, a user-item worker and a gateway; logs in {logs}",
            flush=True,
        )
        started = time.perf_counter()
        env = args.env
        redis = procs.start(RedisServer(log_dir=logs))
        text = procs.start(text_worker(env, logs))
        image = procs.start(image_worker(env, logs))
        shards = [
            procs.start(index_shard(data / f"index-{number}", env, logs, name=f"index-{number}"))
            for number in range(2)
        ]
        useritem = procs.start(useritem_worker(data / "useritem", env, logs))
        router = procs.start(
            gateway(
                [text.address, image.address],
                redis.url,
                env,
                logs,
                shards=[shard.address for shard in shards],
                useritem=useritem.address,
            )
        )
        print(f"all serving after {time.perf_counter() - started:.1f} s", flush=True)
        services: dict[str, Process] = {
            "redis": redis,
            "text": text,
            "image": image,
            "index-0": shards[0],
            "index-1": shards[1],
            "useritem": useritem,
            "gateway": router,
        }
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            inputs = Inputs(args.seed, args.users, photos())
            await prepare(stub, inputs, args)
            run = Run()
            clock = CpuClock({name: [process] for name, process in services.items()})
            print(
                f"load: {args.duration_s:g} s at {args.rate:g} calls/s, a progress line every {args.sample_s:g} s",
                flush=True,
            )
            try:
                await drive(Caller(stub, inputs, args.deadline_s), services, run, args)
            except asyncio.CancelledError:
                # Ctrl-C (asyncio.run cancels this task): report the figures so far. Uncancelled, the
                # task ends normally and asyncio.run returns instead of raising KeyboardInterrupt.
                run.interrupted = True
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()
            run.cpu_s = clock.used()  # of the processes still running, and this one
        report(run, args)
    print("stopped every process", flush=True)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--duration-s", type=float, default=600.0, help="length of the load (default 600)")
    parser.add_argument("--rate", type=float, default=20.0, help="calls per second, all kinds (default 20)")
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=parse_mix(DEFAULT_MIX),
        help=f"weight per call kind (default {DEFAULT_MIX})",
    )
    parser.add_argument("--deadline-s", type=float, default=5.0, help="deadline of every call (default 5)")
    parser.add_argument("--sample-s", type=float, default=60.0, help="RSS sampling period (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every input and the call order")
    parser.add_argument("--captions", type=int, default=300, help="captions indexed (default 300)")
    parser.add_argument("--users", type=int, default=300, help="users of the synthetic ratings")
    parser.add_argument("--items", type=int, default=300, help="items of the synthetic ratings")
    parser.add_argument(
        "--env",
        action="append",
        type=env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of every service, e.g. TEXT_TORCH_THREADS=1 (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    args.env = dict(args.env)
    if not (args.duration_s > 0 and args.rate > 0 and args.deadline_s > 0 and args.sample_s > 0):
        parser.error("--duration-s, --rate, --deadline-s and --sample-s must be > 0")
    if args.captions < K or args.users < 2 or args.items < K + RATINGS_PER_USER:
        parser.error(f"need --captions >= {K}, --users >= 2, --items >= {K + RATINGS_PER_USER}")
    try:
        asyncio.run(soak(args))
    except KeyboardInterrupt:
        print("interrupted; every process stopped", flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
