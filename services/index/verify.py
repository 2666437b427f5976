"""`python -m services.index verify DIR`: check every snapshot and log segment of a shard's data directory
without changing anything, and say whether the shard would start."""

from dataclasses import dataclass, field
from pathlib import Path

from services.index import committed, snapshot, wal
from services.index.claims import Claims
from services.index.damage import Damaged, Problem, recovery_hint


@dataclass
class Verdict:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    intact_snapshots: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    records: int = 0
    starts_from: int | None = None  # the snapshot the shard would load (0: the log alone); None: refuses

    @property
    def clean(self) -> bool:
        return not self.problems


def verify(data_dir: Path) -> Verdict:
    verdict = Verdict()
    log_dir, snapshots = data_dir / "log", data_dir / "snapshots"
    if not data_dir.is_dir():
        verdict.problems.append(Problem(data_dir, None, "no such directory"))
        return verdict
    verdict.problems += _claims_problems(data_dir)
    for segment in snapshot.complete(snapshots):
        found = snapshot.check(snapshot.folder_of(snapshots, segment))
        verdict.problems += found
        if not found:
            verdict.intact_snapshots.append(segment)
    numbers = wal.segments(log_dir)
    verdict.segments = numbers
    everything = wal.inspect(log_dir, numbers[0] if numbers else 0)
    verdict.records = everything.records
    verdict.problems += everything.problems
    if everything.marker_problem is not None:
        verdict.problems.append(everything.marker_problem)
    if everything.cut is not None:
        path, offset = everything.cut
        verdict.notes.append(
            f"{path} ends in an incomplete record at byte {offset} (a write interrupted before it was "
            "acknowledged): the shard cuts it off on start"
        )
    base = verdict.intact_snapshots[-1] if verdict.intact_snapshots else 0
    needed = wal.inspect(log_dir, base)
    verdict.problems += [problem for problem in needed.problems if problem not in verdict.problems]
    verdict.starts_from = None if needed.problems or _claims_problems(data_dir) else base
    for path in sorted(snapshots.glob("*.damaged*")) + sorted(log_dir.glob("*.damaged*")):
        verdict.notes.append(f"{path} was set aside as damaged earlier (not read)")
    return verdict


def report(data_dir: Path, verdict: Verdict) -> list[str]:
    lines = [f"index data directory {data_dir}"]
    snapshots = ", ".join(f"{segment:012d}" for segment in verdict.intact_snapshots) or "none"
    lines.append(f"  intact snapshots: {snapshots}")
    if verdict.segments:
        first, last = verdict.segments[0], verdict.segments[-1]
        lines.append(
            f"  log: {len(verdict.segments)} segments ({first:012d} to {last:012d}), "
            f"{verdict.records} intact records"
        )
    lines += [f"  DAMAGED {problem}" for problem in verdict.problems]
    lines += [f"  note: {note}" for note in verdict.notes]
    if verdict.clean:
        lines.append(f"clean: the shard starts from {_base(verdict.starts_from)} and the log after it")
    elif verdict.starts_from is not None:
        lines.append(
            f"damaged ({len(verdict.problems)} problems), but nothing the shard needs: it starts from "
            f"{_base(verdict.starts_from)} and the log after it (a damaged newer snapshot is set aside, "
            f"and a damaged {committed.NAME} ignored); a later snapshot replaces what is damaged"
        )
    else:
        lines.append(
            f"damaged ({len(verdict.problems)} problems): the shard refuses to start; {recovery_hint(data_dir)}"
        )
    return lines


def _base(segment: int | None) -> str:
    return f"snapshot {segment:012d}" if segment else "no snapshot (the log from segment 0)"


def _claims_problems(data_dir: Path) -> list[Problem]:
    """The claims file's damage (the shard refuses to start with it)."""
    try:
        Claims(data_dir).load()
    except Damaged as damaged:
        return damaged.problems
    return []
