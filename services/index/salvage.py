"""`python -m services.index salvage DIR`: make a damaged data directory loadable, keeping every intact
record, and report exactly what could not be kept.

- A damaged snapshot is set aside (renamed `<segment>.damaged`, out of what the shard reads).
- A damaged log segment is rewritten with every intact record, resynchronising after a damaged stretch at
  the next offset where a frame's checksums hold; the original is set aside as `<name>.damaged`. A
  segment cut short gets its seal back; an incomplete last record is cut off, as the shard would.
- Missing segments get empty placeholders, so the log runs without gaps again.
- When no intact snapshot remains and the log does not run from segment 0, the intact spaces of the
  newest damaged snapshot become a new snapshot in its place (or, failing that, an empty one at the first
  segment): what only the damaged files held is reported lost.
- `log/COMMITTED` is rewritten to the log as it now is.
- A damaged `CLAIMS` (the claims of the spaces whose home this shard is) is set aside: each of those spaces
  is claimed again by its next writer, in the dimension and generation that writer brings; the report
  lists them as lost claims.

Every loss is reported with its file and byte range and how many records it held (exact where the
frame headers show it, else "at least").
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.durable import fsync_dir, write_synced
from services.index import claims, committed, snapshot, wal
from services.index.claims import Claims
from services.index.damage import Damaged
from services.index.records import MAGIC, SEAL, frame, frame_v1, next_intact, read_frame, version_of


@dataclass
class Loss:
    path: Path
    start: int | None  # byte range [start, end) of the original file; None: a whole file or space
    end: int | None
    records: int  # records known to be lost there
    exact: bool  # `records` is the count (else: at least that many)
    what: str
    covered_by: int | None = None  # an intact snapshot that holds what this log stretch held

    @property
    def size(self) -> int:
        start, end = self.start, self.end
        return 0 if start is None or end is None else end - start

    def __str__(self) -> str:
        where = f" bytes {self.start}-{(self.end or 0) - 1} ({self.size} bytes)" if self.size else ""
        if self.covered_by is not None:
            return f"{self.path}{where}: {self.what}; nothing lost (snapshot {self.covered_by:012d} holds it)"
        if self.exact:
            count = f"{self.records} record{'s' * (self.records != 1)}"
        else:
            count = f"at least {self.records} record(s)" if self.records else "an unknown number of records"
        return f"{self.path}{where}: {self.what}; lost {count}"


@dataclass
class Salvaged:
    actions: list[str] = field(default_factory=list)
    losses: list[Loss] = field(default_factory=list)
    kept_records: int = 0

    @property
    def lost(self) -> list[Loss]:
        return [loss for loss in self.losses if loss.covered_by is None]


@dataclass
class _Segment:
    version: int
    records: list[bytes]  # intact record bodies (seals left out)
    losses: list[tuple[int, int, int, bool, str]]  # (start, end, records, exact, what)
    intact_end: int  # where the original's readable content ends (before an incomplete tail)
    torn_at: int | None  # an incomplete last record starts here
    sealed: bool
    stray_seal: bool = False  # a seal with records after it (kept; the seal is dropped)


def _read_segment(data: bytes) -> _Segment:
    version, at = version_of(data)
    result = _Segment(version, [], [], 0, None, False)
    if version == 2 and at == 0:
        result.torn_at = 0 if data else None
        return result
    while at < len(data):
        found = read_frame(data, at, version)
        if found.incomplete:
            result.torn_at = at
            break
        if not found.damage:
            if not found.seal:
                result.records.append(found.record)
            result.stray_seal = result.stray_seal or (result.sealed and not found.seal)
            result.sealed = found.seal
            at = found.end
            continue
        result.sealed = False
        if version == 2 and found.end:  # the header is intact: exactly this one record is lost
            result.losses.append((at, found.end, 1, True, found.damage))
            at = found.end
            continue
        resume = next_intact(data, at + 1, version)
        end = len(data) if resume is None else resume
        result.losses.append((at, end, 1, False, f"{found.damage}; unreadable up to byte {end}"))
        at = end
    result.intact_end = len(data) if result.torn_at is None else result.torn_at
    return result


def _rewrite(path: Path, content: bytes) -> Path:
    """Replace `path` with `content`, keeping the original as `<name>.damaged`; returns where it went."""
    temporary = path.with_name(f".salvage-{path.name}.tmp")
    write_synced(temporary, content)
    aside = _aside_name(path)
    os.replace(path, aside)
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return aside


def _aside_name(path: Path) -> Path:
    target = path.with_name(f"{path.name}.damaged")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.damaged-{number}")
    return target


def salvage(data_dir: Path) -> Salvaged:
    result = Salvaged()
    log_dir, snapshots = data_dir / "log", data_dir / "snapshots"
    log_dir.mkdir(parents=True, exist_ok=True)
    intact: list[int] = []
    damaged: list[tuple[int, Path]] = []
    for segment in snapshot.complete(snapshots):
        folder = snapshot.folder_of(snapshots, segment)
        problems = snapshot.check(folder)
        if not problems:
            intact.append(segment)
            continue
        aside = snapshot.set_aside(folder)
        damaged.append((segment, aside))
        result.actions.append(
            f"set aside snapshot {folder} as {aside.name}: " + "; ".join(map(str, problems))
        )
    _salvage_log(log_dir, result)
    base = intact[-1] if intact else 0
    numbers = wal.segments(log_dir)
    if (not intact and numbers and numbers[0] > 0) or (not intact and damaged and not numbers):
        base = _rebuild_snapshot(snapshots, log_dir, damaged, numbers, result)
    _fill_gaps(log_dir, base, result)
    _rewrite_marker(log_dir, result)
    _salvage_claims(data_dir, result)
    for loss in result.losses:
        if intact and loss.path.parent == log_dir and int(loss.path.name.split(".")[0]) < base:
            loss.covered_by = base
    return result


def _salvage_log(log_dir: Path, result: Salvaged) -> None:
    numbers = wal.segments(log_dir)
    mark, wrong = committed.read(log_dir / committed.NAME)
    if wrong:
        result.actions.append(f"{log_dir / committed.NAME} was damaged ({wrong}): rewritten below")
    for position, number in enumerate(numbers):
        path = wal.segment_path(log_dir, number)
        data = path.read_bytes()
        found = _read_segment(data)
        result.kept_records += len(found.records)
        last = position == len(numbers) - 1
        for start, end, records, exact, what in found.losses:
            result.losses.append(Loss(path, start, end, records, exact, what))
        rewrite = bool(found.losses) or found.stray_seal
        if not last and found.torn_at is not None:
            result.losses.append(
                Loss(path, found.torn_at, len(data), 1, False, "ends inside a record: it was cut short")
            )
            rewrite = True
        elif not last and found.version == 2 and not found.sealed:
            if not any(end == len(data) for _, end, *_ in found.losses):  # else the seal was in the damage
                what = f"ends without its seal: whatever followed byte {len(data)} was cut off"
                result.losses.append(Loss(path, len(data), None, 0, False, what))
            rewrite = True
        if mark is not None and mark.segment == number and found.intact_end < mark.length:
            result.losses.append(
                Loss(
                    path,
                    found.intact_end,
                    mark.length,
                    1,
                    False,
                    f"acknowledged up to byte {mark.length}, but the file holds intact records only up to "
                    f"byte {found.intact_end}",
                )
            )
        if rewrite:
            if found.version == 2:
                content = MAGIC + b"".join(map(frame, found.records)) + (b"" if last else SEAL)
            else:
                content = b"".join(map(frame_v1, found.records))
            aside = _rewrite(path, content)
            result.actions.append(
                f"rewrote {path} with its {len(found.records)} intact records; the original is {aside.name}"
            )
        elif last and found.torn_at is not None:
            wal.cut(path, found.torn_at)
            result.actions.append(
                f"cut the incomplete last record off {path} at byte {found.torn_at} (never acknowledged)"
            )
    if mark is not None and numbers and mark.segment > numbers[-1]:
        path = wal.segment_path(log_dir, mark.segment)
        result.losses.append(
            Loss(path, None, None, 1, False, f"missing, but {mark.length} bytes of it were acknowledged")
        )


def _rebuild_snapshot(
    snapshots: Path, log_dir: Path, damaged: list[tuple[int, Path]], numbers: list[int], result: Salvaged
) -> int:
    """No intact snapshot, and the log does not run from 0: write a snapshot of what the newest damaged
    one still holds intact (or an empty one at the first segment); returns its segment."""
    for segment, aside in reversed(damaged):
        try:
            states, problems = snapshot.read_intact(aside)
        except snapshot.SnapshotDamaged as error:
            result.actions.append(f"{aside}: nothing readable ({'; '.join(map(str, error.problems))})")
            continue
        for problem in problems:
            result.losses.append(
                Loss(problem.path, problem.offset, None, 1, False, f"{problem.what}: that space is lost")
            )
        _write_snapshot(snapshots, segment, states)
        result.actions.append(
            f"wrote snapshot {segment:012d} from the {len(states)} intact spaces of {aside.name}"
        )
        return segment
    first = numbers[0] if numbers else 0
    _write_snapshot(snapshots, first, {})
    result.losses.append(
        Loss(
            snapshots,
            None,
            None,
            1,
            False,
            f"no snapshot is readable and the log starts at segment {first}: every record before it is lost",
        )
    )
    result.actions.append(f"wrote an empty snapshot {first:012d} so the log from segment {first} loads")
    return first


def _write_snapshot(snapshots: Path, segment: int, states: dict[str, dict[str, Any]]) -> None:
    folder = snapshot.write(snapshots, segment, states, snapshot.Deadline())
    problems = snapshot.read_back(folder, snapshot.Deadline())
    if problems:
        raise OSError(f"the salvaged snapshot {folder} read back damaged: {'; '.join(map(str, problems))}")


def _fill_gaps(log_dir: Path, base: int, result: Salvaged) -> None:
    numbers = [number for number in wal.segments(log_dir) if number >= base]
    last = numbers[-1] if numbers else base
    for number in range(base, last + 1):
        if number in numbers:
            continue
        path = wal.segment_path(log_dir, number)
        write_synced(path, MAGIC + (SEAL if number < last else b""))
        result.losses.append(Loss(path, None, None, 0, False, "missing"))
        result.actions.append(f"wrote an empty placeholder for the missing {path}")
    fsync_dir(log_dir)


def _salvage_claims(data_dir: Path, result: Salvaged) -> None:
    try:
        Claims(data_dir).load()
    except Damaged as damaged:
        path = data_dir / claims.FILE
        aside = path.with_name(f"{claims.FILE}.damaged")
        os.replace(path, aside)
        fsync_dir(data_dir)
        what = "; ".join(problem.what for problem in damaged.problems)
        result.losses.append(
            Loss(path, None, None, 0, False, f"{what}: the claims of this shard's spaces are lost")
        )
        result.actions.append(
            f"set aside {path} as {aside.name}: each space it claimed is claimed again by its next writer"
        )


def _rewrite_marker(log_dir: Path, result: Salvaged) -> None:
    numbers = wal.segments(log_dir)
    path = log_dir / committed.NAME
    if not numbers:
        path.unlink(missing_ok=True)
        return
    size = wal.segment_path(log_dir, numbers[-1]).stat().st_size
    write_synced(path, committed.pack(committed.Committed(numbers[-1], size)))
    fsync_dir(log_dir)
    result.actions.append(f"rewrote {path}: segment {numbers[-1]:012d}, {size} bytes")


def report(data_dir: Path, salvaged: Salvaged) -> list[str]:
    lines = [f"salvaged index data directory {data_dir}"]
    lines += [f"  {action}" for action in salvaged.actions]
    lost = salvaged.lost
    lines += [f"  {'LOST' if loss.covered_by is None else 'damaged'} {loss}" for loss in salvaged.losses]
    if not lost:
        lines.append(f"kept every intact record ({salvaged.kept_records} in the log); nothing was lost")
        return lines
    counted = sum(loss.records for loss in lost if loss.exact)
    uncounted = sum(1 for loss in lost if not loss.exact)
    lines.append(
        f"kept every intact record ({salvaged.kept_records} in the log); lost {sum(loss.size for loss in lost)} "
        f"bytes of log: {counted} records counted exactly, plus {uncounted} places whose count is unknown"
    )
    return lines
