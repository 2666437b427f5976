"""A user-item Fit's peak memory per interaction and per distinct id, against services/useritem/memory.py.

Each configuration runs in a fresh process: the process warms torch up with a small Fit, then runs one
whole Fit the way the worker does (FitRequest messages of 50,000 synthetic interactions through
InteractionBuffer, numbering, training, the model, staging and promotion in a temporary directory) and
reports the peak resident memory (VmHWM) over its resident memory before the Fit. Differences between
configurations give the cost of an interaction (same ids, more interactions) and of an id (same
interactions, more ids, ids of 8 and of 512 bytes); they are compared with the budget memory.py makes
(FIT_BYTES_PER_INTERACTION, fit_bytes_per_id), which the pod's memory limit is checked against. Small
runs overstate the cost of an id (the allocators' fixed overheads); --at-limits runs one Fit at the
worker's default USERITEM_MAX_INTERACTIONS and USERITEM_MAX_IDS with ids of USERITEM_MAX_ID_BYTES, the
case the budget is for, and compares it with the budget's Fit part.

Usage: python bench/useritem_memory.py [--quick | --at-limits] [--epochs E]
(--quick: 4 times fewer interactions and ids; the default run takes about 15 minutes on 2 cores,
--at-limits 80 minutes with one epoch, on 2 shared cores)
"""

import argparse
import gc
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def one(interactions: int, users: int, items: int, width: int, epochs: int) -> None:
    """Run one Fit in this process; print its peak over the warm process, in bytes."""
    import numpy as np
    import torch
    from embeddings.v1 import recommender_pb2 as rec

    from services.useritem.fitting import train_config
    from services.useritem.interactions import FitRules, InteractionBuffer
    from services.useritem.settings import UserItemSettings
    from services.useritem.store import ModelStore
    from services.useritem.training import build_model, train

    torch.set_num_threads(1)
    settings = UserItemSettings(data_dir=tempfile.mkdtemp(prefix="useritem-memory-"), epochs=epochs)
    config = train_config(settings)
    rules = FitRules(False, 0.5, 5.0, 20, 10**9, 512)

    def fit(count: int, user_count: int, item_count: int, name: str) -> None:
        rng = np.random.default_rng(0)
        buffer = InteractionBuffer(rules)
        for start in range(0, count, 50_000):
            at = np.arange(start, min(start + 50_000, count))
            # every id appears (the first ones in order), then ids at random
            user = np.where(at < user_count, at, rng.integers(0, user_count, len(at)))
            item = np.where(at < item_count, at, rng.integers(0, item_count, len(at)))
            stars = rng.integers(1, 11, len(at)) / 2
            message = rec.FitRequest(
                interactions=[
                    rec.Interaction(
                        user_id=f"u{u}".rjust(width, "0"), item_id=f"i{i}".rjust(width, "0"), rating=s
                    )
                    for u, i, s in zip(user.tolist(), item.tolist(), stars.tolist(), strict=True)
                ]
            )
            buffer.add(message.interactions)
            del message
        data = buffer.dataset()
        del buffer
        parameters, metrics = train(data, config, False, lambda _: None, threading.Event())
        model = build_model(name, data, parameters, metrics, False, (0.5, 5.0), config.l2)
        store = ModelStore(settings.data_dir, 3)
        store.stage(model)
        store.promote(model)
        _ = model.user_index, model.item_index  # what serving builds at its first call

    fit(6000, 200, 100, "warm")
    gc.collect()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    fit(interactions, users, items, "mf")
    print(_status("VmHWM") - base)


def measure(interactions: int, users: int, items: int, width: int, epochs: int) -> int:
    argv = [sys.executable, __file__, "--one", *map(str, (interactions, users, items, width, epochs))]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--at-limits", action="store_true")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--one", nargs=5, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(*args.one)
        return

    from services.useritem.memory import FIT_BYTES_PER_INTERACTION, fit_bytes_per_id
    from services.useritem.settings import UserItemSettings

    if args.at_limits:
        settings = UserItemSettings()
        count, ids, width = settings.max_interactions, settings.max_ids, settings.max_id_bytes
        peak = measure(count, ids // 2, ids - ids // 2, width, args.epochs)
        budget = count * FIT_BYTES_PER_INTERACTION + ids * fit_bytes_per_id(settings)
        print(
            f"{count:,} interactions, {ids:,} ids of {width} bytes: peak {peak / 2**30:.2f} GiB over the warm "
            f"process; the budget's Fit part {budget / 2**30:.2f} GiB"
        )
        return

    scale = 4 if args.quick else 1
    few, many = 1_000_000 // scale, 4_000_000 // scale
    ids = 200_000 // scale
    small = measure(few, 20_000, 2_000, 8, args.epochs)
    large = measure(many, 20_000, 2_000, 8, args.epochs)
    per_interaction = (large - small) / (many - few)
    print(f"{few:,} interactions, 22,000 ids: peak {small / 2**20:.0f} MiB over the warm process")
    print(f"{many:,} interactions, 22,000 ids: peak {large / 2**20:.0f} MiB")
    print(f"per interaction: {per_interaction:.0f} B (budget {FIT_BYTES_PER_INTERACTION} B)")
    for width in (8, 512):
        peak = measure(few, ids, ids, width, args.epochs)
        per_id = (peak - small) / (2 * ids - 22_000)
        budget = fit_bytes_per_id(UserItemSettings(max_id_bytes=width))
        print(
            f"{few:,} interactions, {2 * ids:,} ids of {width} bytes: peak {peak / 2**20:.0f} MiB; "
            f"per id {per_id:.0f} B (budget at 32 factors, USERITEM_MAX_ID_BYTES={width}: {budget} B)"
        )


if __name__ == "__main__":
    main()
