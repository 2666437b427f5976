"""What the benchmarks share: their command lines, the processes of a measurement (started and stopped
together, logs and data in one place each) and the settings those processes read, the CPU and memory they
use (from /proc), and latency rounds of calls made one at a time over paths that take turns."""

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import numpy as np
from embeddings.v1 import types_pb2 as pb
from pydantic_settings import BaseSettings

from harness.processes import Process, new_log_dir, running

P = TypeVar("P", bound=Process)
S = TypeVar("S", bound=BaseSettings)
Call = Callable[..., Awaitable[Any]]


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A bench's command line, whose --help shows the module docstring as it is laid out."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def env_pair(text: str) -> tuple[str, str]:
    """An argparse type for KEY=VALUE (environment given to the started services)."""
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def settings_under(kind: type[S], env: Mapping[str, str]) -> S:
    """The settings a service started with `env` reads: this process's environment with `env` over it, as
    harness.processes gives a child (so a bench sizes its requests by the limits the service really has)."""
    with mock.patch.dict(os.environ, env):
        return kind()


@dataclass(frozen=True)
class Processes:
    """The processes of one measurement. `start` runs one and waits until it answers; every one stops,
    the last started first, when the `with processes(...)` block ends. Their logs go to `logs` (kept, to
    read afterwards), their data to `data` (a temporary folder, removed once they have stopped)."""

    stack: contextlib.ExitStack
    logs: Path
    data: Path

    def start(self, process: P) -> P:
        return self.stack.enter_context(running(process))


@contextlib.contextmanager
def processes(prefix: str) -> Iterator[Processes]:
    """A measurement's processes, with a new log folder and a temporary data folder named `prefix...`."""
    logs = new_log_dir()
    with tempfile.TemporaryDirectory(prefix=prefix) as data, contextlib.ExitStack() as stack:
        yield Processes(stack, logs, Path(data))


class CpuClock:
    """User + system CPU seconds used since the clock was made, by each group of processes (summed) and by
    this process, as "client"."""

    def __init__(self, groups: Mapping[str, Sequence[Process]]) -> None:
        self.groups = groups
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        # A process that has exited has no /proc entry to read once it is reaped.
        used = {
            name: sum(process.cpu_seconds() for process in group)
            for name, group in self.groups.items()
            if all(process.running() for process in group)
        }
        return {**used, "client": sum(os.times()[:2])}

    def used(self) -> dict[str, float]:
        """Seconds used since the start; a group in which a process has exited is left out."""
        now = self._read()
        return {name: seconds - self._start[name] for name, seconds in now.items() if name in self._start}


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (its peak) of a process in MiB, from /proc/<pid>/status; empty once
    the process has exited (a zombie has neither line)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return {}
    lines = (line.partition(":") for line in status.splitlines())
    return {key: int(value.split()[0]) / 1024 for key, _, value in lines if key in ("VmRSS", "VmHWM")}


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 and p99 (numpy's linear interpolation)."""
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


async def timed_calls(call: Call, requests: Sequence[object]) -> tuple[list[float], list[Any]]:
    """Milliseconds of each call, made one at a time, and the answers (to check apart, untimed)."""
    times, answers = [], []
    for request in requests:
        started = time.perf_counter()
        answer = await call(request, timeout=30)
        times.append((time.perf_counter() - started) * 1000)
        answers.append(answer)
    return times, answers


@dataclass
class Rounds:
    """Per path: each round's latency p50 and p99 (ms), CPU milliseconds per call of each process group,
    and answers."""

    latency: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # path -> p50/p99 -> rounds
    cpu_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # path -> group -> rounds
    answers: dict[str, list[list[Any]]] = field(default_factory=dict)  # path -> rounds

    def median(self, path: str, key: str) -> float:
        return statistics.median(self.latency[path][key])

    def cpu_median(self, path: str) -> dict[str, float]:
        return {group: statistics.median(values) for group, values in self.cpu_ms[path].items()}


async def alternating_rounds(
    paths: Mapping[str, tuple[Call, Sequence[object]]],
    rounds: int,
    groups: Mapping[str, Sequence[Process]],
    warmup: int,
    label: str = "",
) -> Rounds:
    """Each path's requests (e.g. through the gateway, straight to a worker) made one at a time, `rounds`
    times, after its first `warmup` requests once untimed. The paths take turns going first, so that none
    always runs on a machine the other has just warmed or loaded. Prints each round's percentiles."""
    for call, requests in paths.values():
        await timed_calls(call, requests[:warmup])
    result = Rounds(
        {path: {"p50": [], "p99": []} for path in paths},
        {path: {group: [] for group in groups} for path in paths},
        {path: [] for path in paths},
    )
    for round_ in range(rounds):
        for path in list(paths) if round_ % 2 == 0 else list(paths)[::-1]:
            call, requests = paths[path]
            clock = CpuClock(groups)
            times, answers = await timed_calls(call, requests)
            used = clock.used()
            for key, value in percentiles(times).items():
                result.latency[path][key].append(value)
            for group in groups:
                result.cpu_ms[path][group].append(used[group] * 1000 / len(requests))
            result.answers[path].append(answers)
        print(
            f"{label}round {round_ + 1}: "
            + ", ".join(
                f"{path} p50 {result.latency[path]['p50'][-1]:.2f} ms p99 {result.latency[path]['p99'][-1]:.2f} ms"
                for path in paths
            ),
            flush=True,
        )
    return result


# --- vectors for the index benchmarks --------------------------------------------------------------------


def unit_vectors(count: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """`count` x `dim` float32 standard normal rows scaled to unit length (built in chunks: no float64)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, chunk):
        block = out[start : start + chunk]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """Row numbers of the exact top-k of each query by inner product (chunks of rows bound memory)."""
    best_rows = np.full((queries.shape[0], 0), -1, dtype=np.int64)
    best_scores = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    for start in range(0, vectors.shape[0], chunk):
        scores = queries @ vectors[start : start + chunk].T  # queries x chunk
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        rows = np.concatenate([best_rows, top + start], axis=1)
        merged = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        keep = np.argsort(-merged, axis=1, kind="stable")[:, :k]
        best_rows = np.take_along_axis(rows, keep, axis=1)
        best_scores = np.take_along_axis(merged, keep, axis=1)
    return best_rows


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the search returned."""
    return float(
        np.mean(
            [
                len(set(ids) & set(row.tolist())) / truth.shape[1]
                for ids, row in zip(found, truth, strict=True)
            ]
        )
    )


def wire(row: np.ndarray) -> pb.Vector:
    return pb.Vector(data=row.tobytes(), dim=int(row.shape[0]), dtype=pb.DTYPE_FLOAT32)
