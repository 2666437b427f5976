"""What a shard loads on start: the newest intact snapshot and the log after it, or a refusal.

The newest snapshot is tried first; a damaged one is named in the log and the one before it is tried
(the shard keeps two, and the log from the older one's segment on). Once one loads, the log from its
segment on must pass `wal.inspect`. If none loads, the log alone must run from segment 0. Whatever cannot
be rebuilt that way raises `Damaged`, naming every damaged file, before anything on disk is changed;
only once the state is whole are the damaged snapshots tried on the way set aside and an incomplete last
record cut off.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.index import snapshot
from services.index.damage import Damaged, Problem
from services.index.records import Op
from services.index.wal import AppendLog

log = logging.getLogger("index.recovery")


@dataclass
class Recovered:
    start: int  # the first log segment the snapshot does not cover (0: no snapshot)
    states: dict[str, dict[str, Any]]  # each space's state in that snapshot
    ops: list[Op]  # the log from `start` on
    snapshot: int | None  # the snapshot's segment (None: none loaded)
    set_aside: list[Path] = field(default_factory=list)


def recover(data_dir: Path, appends: AppendLog) -> Recovered:
    directory = data_dir / "snapshots"
    damaged: list[tuple[Path, list[Problem]]] = []
    loaded: int | None = None
    states: dict[str, dict[str, Any]] = {}
    for segment in reversed(snapshot.complete(directory)):
        folder = snapshot.folder_of(directory, segment)
        try:
            states = snapshot.read(folder)
        except snapshot.SnapshotDamaged as error:
            damaged.append((folder, error.problems))
            continue
        loaded = segment
        break
    problems = [problem for _, found in damaged for problem in found]
    try:
        ops = appends.replay(loaded or 0)
    except Damaged as error:
        raise Damaged(data_dir, problems + error.problems) from error
    recovered = Recovered(loaded or 0, states, ops, loaded)
    for folder, found in damaged:
        aside = snapshot.set_aside(folder)
        recovered.set_aside.append(aside)
        log.error(
            "index snapshot %s is damaged (%s); loaded the one before it and the log instead, and moved "
            "the damaged one to %s",
            folder,
            "; ".join(map(str, found)),
            aside,
        )
    return recovered
