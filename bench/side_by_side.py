"""The gateway + text worker side by side with a peer: Infinity (infinity-emb, ONNX Runtime fp32, the same
all-MiniLM-L6-v2 weights), or another version of this system (an A/B of one change).

Both servers run on this machine at once, with the gateway's cache off; each load (clients x sentences per
request) is run on one, then the other, with the same corpus (2000 distinct sentences of 8-20 words), the
same load generator logic and the same duration, for several rounds, the server that goes first taking
turns, because these machines drift by 15-30% within an hour. Every load runs once on each server untimed
first (--warmup-s): torch builds its kernels for each new input shape, and a first round would count that.
It prints each round, then per load both servers' medians (requests/s, sentences/s, p50 and p99 latency),
the median of the per-round ratios (ours / theirs, in sentences/s) and the gateway's own CPU per request.

The peer kit is ../shared/peer_bench (read-only; its setup.sh makes the peer's venv in ~/.cache/peer_bench);
the load generators are its load.py (HTTP, Infinity) and grpc_load.py (gRPC, the gateway's Encode).

  make bench-peer                                        # against Infinity, 3 rounds of 15 s
  python bench/side_by_side.py --against-env TEXT_SENTENCE_RUNTIME=torch      # A/B: ONNX against torch
  python bench/side_by_side.py --against-checkout /tmp/base --loads 64x1 1x1  # A/B: against older code
"""

import ast
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common import Processes, arguments, env_pair, processes

from harness.processes import ROOT, Service, gateway, text_worker

KIT = ROOT.parent / "shared" / "peer_bench"
PEER_DIR = Path(os.environ.get("PEER_DIR", Path.home() / ".cache" / "peer_bench"))


@dataclass(frozen=True)
class Load:
    clients: int
    batch: int  # sentences per request

    @property
    def name(self) -> str:
        return f"{self.clients}x{self.batch}"

    @property
    def warmup(self) -> int:
        """Requests sent untimed first (about 200 sentences' worth, at least 20 requests)."""
        return max(20, 200 // self.batch)


def load_of(text: str) -> Load:
    clients, _, batch = text.partition("x")
    return Load(int(clients), int(batch or 1))


@dataclass
class Side:
    """One server under test: how to send it a load, and the pids whose CPU is reported."""

    label: str
    infinity_pid: int = 0  # the peer, over HTTP
    gateway: Service | None = None  # or one of ours, over gRPC
    worker: Service | None = None

    def measure(self, kit: Path, load: Load, duration: float, label: str) -> dict[str, float]:
        if self.gateway is None:
            return _infinity_run(kit, self.infinity_pid, load, duration, label)
        assert self.worker is not None and self.worker.popen and self.gateway.popen
        pids = f"{self.worker.popen.pid},{self.gateway.popen.pid}"
        command = [
            sys.executable,
            str(kit / "grpc_load.py"),
            *("--address", self.gateway.address, "-c", str(load.clients), "-b", str(load.batch)),
            *("-t", str(duration), "-r", "1", "--warmup", str(load.warmup), "--server-pids", pids),
            *("--label", label),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "gen" / "python")}
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=False).stdout
        runs = [
            ast.literal_eval(line) for line in output.splitlines() if line.startswith(f"{{'label': '{label}'")
        ]
        if not runs:
            raise RuntimeError(f"grpc_load.py gave no result:\n{output[-2000:]}")
        run = runs[-1]
        worker_pct, gateway_pct = run.pop("server_cpu_pct")
        run["worker_cpu_pct"], run["gateway_cpu_pct"] = worker_pct, gateway_pct
        run["gateway_cpu_ms_per_request"] = 10 * gateway_pct / run["req_per_s"] if run["req_per_s"] else 0.0
        return dict(run)


def _infinity_run(kit: Path, pid: int, load: Load, duration: float, label: str) -> dict[str, float]:
    python = PEER_DIR / "venv" / "bin" / "python"
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as results:
        command = [
            str(python),
            str(kit / "load.py"),
            *("-c", str(load.clients), "-b", str(load.batch), "-n", str(10**9), "-t", str(duration)),
            *("-r", "1", "--pause", "0", "--warmup", str(load.warmup), "--server-pid", str(pid)),
            *("--label", label, "--json", results.name),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=False).stdout
        runs = [json.loads(line) for line in Path(results.name).read_text().splitlines()]
    runs = [run for run in runs if run.get("kind") == "run"]
    if not runs:
        raise RuntimeError(f"load.py gave no result:\n{output[-2000:]}")
    return dict(runs[-1])


@contextlib.contextmanager
def infinity(kit: Path) -> Iterator[int]:
    """Infinity on ONNX Runtime fp32 (the kit's serve_infinity.sh), stopped afterwards; yields its pid."""
    env = {**os.environ, "PEER_DIR": str(PEER_DIR), "ENGINE": "optimum"}
    script = str(kit / "serve_infinity.sh")
    started = subprocess.run([script], env=env, capture_output=True, text=True, check=False)
    if started.returncode:
        raise RuntimeError(f"Infinity did not start:\n{started.stderr[-2000:]}")
    try:
        yield int(started.stdout.split()[-1])
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, check=False)


def start_ours(procs: Processes, label: str, checkout: Path, env: dict[str, str]) -> Side:
    """A text worker (with `env`) and a gateway without cache, running the code in `checkout`."""
    worker = text_worker(env, procs.logs)
    front = gateway([worker.address], "", {"GATEWAY_METRICS_PORT": "0"}, procs.logs)
    for service in (worker, front):
        service.name = f"{service.name}-{label}"
        service.cwd = checkout
        service.env["PYTHONPATH"] = f"{checkout / 'gen' / 'python'}:{checkout}"
    procs.start(worker)
    procs.start(front)
    return Side(label, gateway=front, worker=worker)


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, {platform.system()} {platform.release()}"


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each measurement")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="seconds of each load, untimed, first")
    parser.add_argument(
        "--loads",
        nargs="+",
        type=load_of,
        default=[load_of(x) for x in ("64x1", "16x1", "1x1", "1x32", "4x32")],
    )
    parser.add_argument("--env", type=env_pair, action="append", default=[], help="our worker's KEY=VALUE")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="run our side from this checkout")
    parser.add_argument("--against-checkout", type=Path, help="compare with the system in this checkout")
    parser.add_argument(
        "--against-env", type=env_pair, action="append", default=[], help="its worker's KEY=VALUE"
    )
    parser.add_argument("--kit", type=Path, default=KIT, help="the peer kit (default %(default)s)")
    parser.add_argument("--out", type=Path, help="append the results here as JSON (default: the log folder)")
    args = parser.parse_args()
    against_ours = args.against_checkout is not None or bool(args.against_env)
    if not against_ours and not (PEER_DIR / "venv" / "bin" / "infinity_emb").exists():
        print(f"no peer venv in {PEER_DIR}: run {args.kit / 'setup.sh'} first (about 3 minutes, once)")
        sys.exit(2)

    started = datetime.now(UTC)
    print(f"{started:%Y-%m-%d %H:%M} UTC; {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    records: list[dict[str, object]] = []
    with processes("side-by-side-") as procs, contextlib.ExitStack() as stack:
        ours = start_ours(procs, "ours", args.checkout, dict(args.env))
        if against_ours:
            theirs = start_ours(procs, "theirs", args.against_checkout or ROOT, dict(args.against_env))
        else:
            theirs = Side("infinity", infinity_pid=stack.enter_context(infinity(args.kit)))
        time.sleep(3)  # let start-up work (imports, the first requests' allocations) settle
        for load in args.loads:  # each load once, untimed: torch builds kernels per input shape at first
            for side in (ours, theirs):
                side.measure(args.kit, load, args.warmup_s, f"{side.label}-warmup")
        for round_ in range(args.rounds):
            for load in args.loads:
                order = [ours, theirs] if round_ % 2 == 0 else [theirs, ours]
                for side in order:
                    run = side.measure(args.kit, load, args.duration, f"{side.label}-r{round_ + 1}")
                    records.append({"round": round_ + 1, "load": load.name, "side": side.label, **run})
                    print(
                        f"round {round_ + 1} {load.name:>5} {side.label:>8}: {run['req_per_s']:7.1f} req/s "
                        f"{run['sent_per_s']:7.1f} sent/s p50 {run['lat_ms_p50']:6.1f} ms p99 {run['lat_ms_p99']:6.1f} ms"
                        + (
                            f"  gateway {run['gateway_cpu_ms_per_request']:.2f} ms CPU/req"
                            if side.gateway
                            else ""
                        ),
                        flush=True,
                    )
        print(f"load average at the end {os.getloadavg()[0]:.1f}; logs in {procs.logs}")
        out = args.out or procs.logs / "side_by_side.json"
    with out.open("a") as handle:
        handle.write(
            json.dumps({"started": started.isoformat(), "machine": machine(), "records": records}) + "\n"
        )
    report(records, args.loads, ours.label, theirs.label)
    print(f"results: {out}")


def report(records: list[dict[str, object]], loads: list[Load], ours: str, theirs: str) -> None:
    def of(load: Load, side: str, key: str) -> list[float]:
        return [float(r[key]) for r in records if r["load"] == load.name and r["side"] == side]  # type: ignore[arg-type]

    print(
        f"\nmedians of {len(of(loads[0], ours, 'req_per_s'))} alternating rounds; ratio: {ours} / {theirs}, sentences/s"
    )
    print(
        f"| load (clients x sentences) | {theirs} req/s | {theirs} p50 / p99 ms | {ours} req/s | {ours} p50 / p99 ms "
        "| ratio (rounds) | gateway CPU ms/req |"
    )
    print("|---|---|---|---|---|---|---|")
    for load in loads:
        ratios = [
            a / b
            for a, b in zip(of(load, ours, "sent_per_s"), of(load, theirs, "sent_per_s"), strict=True)
            if b
        ]
        med = {
            side: {k: statistics.median(of(load, side, k)) for k in ("req_per_s", "lat_ms_p50", "lat_ms_p99")}
            for side in (ours, theirs)
        }
        print(
            f"| {load.name} | {med[theirs]['req_per_s']:.1f} | {med[theirs]['lat_ms_p50']:.1f} / {med[theirs]['lat_ms_p99']:.1f} "
            f"| {med[ours]['req_per_s']:.1f} | {med[ours]['lat_ms_p50']:.1f} / {med[ours]['lat_ms_p99']:.1f} "
            f"| {statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) "
            f"| {statistics.median(of(load, ours, 'gateway_cpu_ms_per_request')):.2f} |"
        )


if __name__ == "__main__":
    main()
