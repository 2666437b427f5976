"""What an index shard's storage costs: the snapshot at shutdown with many spaces, and memory and disk when
one id is rewritten over and over. In-process, against IndexStore (default settings but the data
directory), each scenario in a fresh Python process so that its RSS is its own.

  close.    --spaces spaces of --items-per-space items (8-d), one upsert per space; then store.close()
            (which snapshots every space): its seconds, the fsyncs it made and the files it wrote.
  rewrite.  --rewrites upserts of the same id (--dim-d vectors, --batch per write, one fsync each); then
            the process's RSS (VmRSS, and its peak VmHWM) against its RSS before the first write, the
            bytes of the log and of the snapshots on disk, and the rows the space holds for its one
            live item.

Usage: python bench/index_storage.py [--scenario close|rewrite] [--spaces 3000] [--rewrites 204800]
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from services.index.memory import return_freed_arrays
from services.index.records import Item, Op
from services.index.settings import IndexSettings
from services.index.store import IndexStore


def _status(field: str) -> float:
    """A /proc/self/status field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _bytes_under(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.is_dir() else 0


def _files_under(path: Path) -> int:
    return sum(1 for file in path.rglob("*") if file.is_file()) if path.is_dir() else 0


async def close_scenario(args: argparse.Namespace, data_dir: Path) -> None:
    store = IndexStore(IndexSettings(data_dir=str(data_dir)))
    await store.open()
    rng = np.random.default_rng(0)
    for number in range(args.spaces):
        rows = rng.standard_normal((args.items_per_space, 8)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        space = f"space-{number}"
        await store.write(
            [Op(space, f"i{n}", Item(f"i{n}", rows[n], 1, '{"a": "b"}', "m", "1")) for n in range(len(rows))]
        )
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    os.fsync = counting_fsync
    started = time.perf_counter()
    await store.close()
    seconds = time.perf_counter() - started
    os.fsync = real_fsync
    snapshots = data_dir / "snapshots"
    print(
        f"close: {args.spaces} spaces x {args.items_per_space} items: close() {seconds:.2f} s, "
        f"{fsyncs} fsyncs, snapshot files {_files_under(snapshots)} ({_bytes_under(snapshots) / 2**20:.1f} MiB)"
    )


async def rewrite_scenario(args: argparse.Namespace, data_dir: Path) -> None:
    store = IndexStore(IndexSettings(data_dir=str(data_dir)))
    await store.open()
    rng = np.random.default_rng(0)
    before = _status("VmRSS")
    started = time.perf_counter()
    for start in range(0, args.rewrites, args.batch):
        rows = rng.standard_normal((min(args.batch, args.rewrites - start), args.dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        await store.write([Op("s", "same", Item("same", row, 1, "", "m", "1")) for row in rows])
    seconds = time.perf_counter() - started
    if store._snapshot_task is not None:
        await store._snapshot_task
    held = store.held("s")[0]
    print(
        f"rewrite: {args.rewrites} upserts of one id ({args.dim}-d) in {seconds:.1f} s: RSS {before:.0f} -> "
        f"{_status('VmRSS'):.0f} MiB (peak {_status('VmHWM'):.0f}), log {_bytes_under(data_dir / 'log') / 2**20:.1f} "
        f"MiB, snapshots {_bytes_under(data_dir / 'snapshots') / 2**20:.1f} MiB, rows held {held.count} "
        f"for {held.live} live item"
    )
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["close", "rewrite"])
    parser.add_argument("--spaces", type=int, default=3000)
    parser.add_argument("--items-per-space", type=int, default=4)
    parser.add_argument("--rewrites", type=int, default=204_800)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if args.scenario is None:
        for scenario in ("close", "rewrite"):
            subprocess.run([sys.executable, __file__, "--scenario", scenario, *sys.argv[1:]], check=True)
        return
    return_freed_arrays()  # as the shard process does
    with tempfile.TemporaryDirectory(prefix="index-storage-") as directory:
        run = close_scenario if args.scenario == "close" else rewrite_scenario
        asyncio.run(run(args, Path(directory) / "index"))


if __name__ == "__main__":
    main()
