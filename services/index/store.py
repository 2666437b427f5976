"""One shard's items: durable writes through the append-only log, in-memory spaces, snapshots.

Every write goes through one writer task: it takes all writes waiting, appends their records to the
log, fsyncs once for all of them (group commit), applies them to the spaces in log order and only then
acknowledges them. So an acknowledged write is on disk, and memory never holds what the log does not.
Snapshots are taken by the same writer between two batches, so each is one consistent moment; the writer
also compacts a space whose retired rows dominate. A snapshot is read back before the older ones are
deleted: the newest two are kept, with the log from the older one's segment on, so that a damaged
snapshot found on start can be replaced by the one before it and the log.

Each space held here is of one generation (claims.py): a write or search naming a newer one first drops
what is held (a logged generation change, so a restart does the same), one naming an older one is refused
as stale. The claims of the spaces whose home this shard is are kept apart, in `CLAIMS`.
"""

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.index import snapshot
from services.index.claims import Claims
from services.index.records import Generation, Op, encode
from services.index.recovery import recover
from services.index.settings import IndexSettings
from services.index.space import Found, Space
from services.index.wal import AppendLog

log = logging.getLogger("index.store")

_APPLY_CHUNK = 256
_SNAPSHOT = "snapshot"


@dataclass
class _Write:
    ops: list[Op]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class IndexStore:
    def __init__(self, settings: IndexSettings) -> None:
        self._settings = settings
        self._config = settings.engine_config()
        root = Path(settings.data_dir)
        self._log = AppendLog(root / "log")
        self._snapshots = root / "snapshots"
        self.spaces: dict[str, Space] = {}
        self._dimensions: dict[str, int] = {}
        self.claims = Claims(root)
        # None: stop. _SNAPSHOT: the snapshot timer's turn, taken between two write batches.
        self._queue: asyncio.Queue[_Write | str | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsnapshotted = 0  # ops logged since the last snapshot
        self._unsnapshotted_bytes = 0  # and their bytes
        self._snapshot_task: asyncio.Task[None] | None = None
        self._snapshot_deadline = snapshot.Deadline()
        self._kept: int | None = None  # the newest snapshot known intact (loaded, or written and read back)
        self._closing = False
        self._broken: str = ""
        self._opened = False  # open() has loaded everything: until then the spaces are incomplete

    async def open(self) -> None:
        """Load the newest snapshot, replay the log after it, and start taking writes."""
        started = time.monotonic()
        replayed = await asyncio.to_thread(self._load)
        log.info(
            "index loaded from %s in %.1fs: %s (replayed %d logged ops)",
            self._settings.data_dir,
            time.monotonic() - started,
            {name: space.live for name, space in self.spaces.items()} or "empty",
            replayed,
        )
        self._opened = True
        self._tasks.append(asyncio.get_running_loop().create_task(self._writer()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._snapshot_timer()))
        if self._settings.fsync == "interval":
            self._tasks.append(asyncio.get_running_loop().create_task(self._sync_periodically()))

    def _load(self) -> int:
        """Load a snapshot and the log after it (or refuse: `Damaged`); returns the ops replayed."""
        self.claims.load()
        recovered = recover(Path(self._settings.data_dir), self._log)
        for name, state in recovered.states.items():
            self.spaces[name] = Space.from_state(name, state, self._config)
        self._apply(recovered.ops)
        self._log.open(recovered.start)
        self._kept = recovered.snapshot
        self._dimensions = {name: space.dimension for name, space in self.spaces.items()}
        self._unsnapshotted = len(recovered.ops)
        self._unsnapshotted_bytes = self._log.bytes_from(recovered.start)
        return len(recovered.ops)

    async def close(self) -> None:
        """Finish the writes taken, snapshot (so the next start replays nothing) and close the log. The
        snapshots (one in progress, and the one at close) get INDEX_CLOSE_SNAPSHOT_S in all; past that
        they are given up: the log holds every write, and the next start replays it."""
        self._closing = True
        if self._tasks:
            self._queue.put_nowait(None)
            await asyncio.gather(self._tasks[0], return_exceptions=True)
            for task in self._tasks[1:]:
                task.cancel()
            await asyncio.gather(*self._tasks[1:], return_exceptions=True)
        deadline = time.monotonic() + self._settings.close_snapshot_s
        if self._snapshot_task is not None:
            self._snapshot_deadline.at = deadline
            await asyncio.gather(self._snapshot_task, return_exceptions=True)
        if self._unsnapshotted and self._settings.close_snapshot_s > 0:
            await self._snapshot(snapshot.Deadline(deadline), wait=True)
        self._log.close()

    def check_open(self) -> None:
        """Refuse a call while open() is still loading: searches would miss items, deletes call present
        items not found, and writes would be checked against dimensions not loaded yet."""
        if not self._opened:
            raise Unavailable("index shard is still loading its data; retry shortly")

    def dimension(self, space: str) -> int | None:
        return self._dimensions.get(space)

    def generation(self, space: str, epoch: int, dimension: int = 0) -> list[Op]:
        """What a write of generation `epoch` of `space` must be preceded by: nothing when that is the one
        held here (or none is held and it is the first, 0); a generation change (dropping what is held) when
        it is newer; FAILED_PRECONDITION when it is older (the caller's claim is stale)."""
        held = self.held_epoch(space)
        if held == epoch or (held is None and epoch == 0):
            return []
        if held is not None and held > epoch:
            raise self.stale(space, epoch)
        return [Op(space, generation=Generation(epoch, dimension))]

    def stale(self, space: str, epoch: int) -> FailedPrecondition:
        return FailedPrecondition(
            f"space {space!r} was dropped and made again (generation {self.held_epoch(space)} here, {epoch} "
            "asked): the caller's claim of it is stale; look the space up again and retry"
        )

    def held_epoch(self, space: str) -> int | None:
        """The generation of `space` held here; None when none is."""
        held = self.spaces.get(space)
        return None if held is None else held.epoch

    def held(self, space: str = "") -> list[Space]:
        """One space (if this shard holds it) or all, by name."""
        if space:
            return [self.spaces[space]] if space in self.spaces else []
        return [self.spaces[name] for name in sorted(self.spaces)]

    def claim_dimension(self, space: str, dimension: int, field: str, new_generation: bool = False) -> None:
        """Refuse vectors of another dimension than the space's; the first write to a space (or to its new
        generation) sets it."""
        if new_generation:
            self._dimensions[space] = dimension
        known = self._dimensions.setdefault(space, dimension)
        if known != dimension:
            raise InvalidArgument(
                f"has {dimension} dimensions but space {space!r} holds {known}-dimensional vectors",
                field=field,
            )

    async def write(self, ops: list[Op]) -> None:
        """Return once `ops` are durable (per INDEX_FSYNC) and visible to searches."""
        if self._closing:
            raise Unavailable("index shard is shutting down; retry on another instance")
        if self._broken:
            raise Unavailable(f"index shard refuses writes after a failure ({self._broken}); restart it")
        pending = _Write(ops)
        self._queue.put_nowait(pending)
        await asyncio.shield(pending.done)

    async def search(
        self, space: str, query: np.ndarray, k: int, kinds: Sequence[int], payload_equals: dict[str, str]
    ) -> list[Found]:
        held = self.spaces.get(space)
        if held is None:
            return []
        return await asyncio.to_thread(held.search, query, k, kinds, payload_equals)

    async def _writer(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            if first == _SNAPSHOT:
                if self._unsnapshotted:
                    await self._snapshot()
                continue
            batch: list[_Write] = []
            stop = False
            for entry in self._more(first):
                if entry is None:
                    stop = True
                elif isinstance(entry, _Write):
                    batch.append(entry)
            await self._commit(batch)
            if stop:
                return
            if (
                self._unsnapshotted >= self._settings.snapshot_every_ops
                or self._unsnapshotted_bytes >= self._settings.snapshot_log_bytes
            ):
                await self._snapshot()

    def _more(self, first: _Write | str | None) -> list[_Write | str | None]:
        """`first` and everything queued behind it, up to a stop."""
        entries = [first]
        while not self._queue.empty() and entries[-1] is not None:
            entries.append(self._queue.get_nowait())
        return entries

    async def _commit(self, batch: list[_Write]) -> None:
        """Log, sync and apply a batch of writes, then acknowledge them (or fail them all)."""
        try:
            logged = await asyncio.to_thread(self._persist, batch)
        except Exception as error:
            # A failed write was cut back off the log; anything else leaves the log and memory in doubt,
            # so further writes are refused until a restart rebuilds memory from the log.
            log.exception("index write failed")
            if not isinstance(error, OSError) or not self._log.healthy:
                self._broken = repr(error)
            for pending in batch:
                pending.done.set_exception(Unavailable(f"index shard could not store the write: {error!r}"))
            return
        for pending in batch:
            pending.done.set_result(None)
        self._unsnapshotted += sum(len(pending.ops) for pending in batch)
        self._unsnapshotted_bytes += logged

    async def _snapshot_timer(self) -> None:
        while True:
            await asyncio.sleep(self._settings.snapshot_interval_s)
            self._queue.put_nowait(_SNAPSHOT)

    def _persist(self, batch: list[_Write]) -> int:
        """Log and apply a batch; returns the bytes logged."""
        ops = [op for pending in batch for op in pending.ops]
        frames = b"".join(map(encode, ops))
        self._log.write(frames, sync=self._settings.fsync == "always")
        self._apply(ops)
        return len(frames)

    def _apply(self, ops: Sequence[Op]) -> None:
        by_space: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            by_space[op.space].append(op)
        for name, space_ops in by_space.items():
            run: list[Op] = []
            for op in space_ops:  # item ops between generation changes, in order
                if op.generation is None:
                    run.append(op)
                    continue
                self._apply_items(name, run)
                run = []
                self._start_generation(name, op.generation)
            self._apply_items(name, run)

    def _start_generation(self, name: str, generation: Generation) -> None:
        """Drop what is held of the space if it is older than `generation`, and hold the new generation (none,
        for a drop). A change to the generation already held changes nothing: concurrent writes of a new
        generation each log one, and the second must not drop what the first wrote."""
        held = self.spaces.get(name)
        if held is not None and (
            held.epoch > generation.epoch or (held.epoch == generation.epoch and generation.dimension)
        ):
            return
        if held is not None:
            del self.spaces[name]
            log.info(
                "space %s: generation %d (%d items) dropped for generation %d",
                name,
                held.epoch,
                held.live,
                generation.epoch,
            )
        self._dimensions.pop(name, None)
        if generation.dimension:
            self.spaces[name] = Space(name, generation.dimension, self._config, generation.epoch)
            self._dimensions[name] = generation.dimension

    def _apply_items(self, name: str, space_ops: list[Op]) -> None:
        if not space_ops:
            return
        space = self.spaces.get(name)
        if space is None:
            first = next((op.item for op in space_ops if op.item is not None), None)
            if first is None:
                return
            space = self.spaces[name] = Space(name, first.vector.shape[0], self._config)
            self._dimensions.setdefault(name, space.dimension)
        for start in range(0, len(space_ops), _APPLY_CHUNK):
            space.apply(space_ops[start : start + _APPLY_CHUNK])
            if space.wants_compaction(self._settings.compact_min_retired):
                space.compact()

    async def _sync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._settings.fsync_interval_ms / 1000)
            try:
                await asyncio.to_thread(self._log.sync)
            except OSError:
                log.exception("index log fsync failed; writes are refused until a restart")
                self._broken = "fsync failed"

    async def _snapshot(self, deadline: snapshot.Deadline | None = None, wait: bool = False) -> None:
        """Roll the log and capture every space (between two write batches), then write it to disk in
        the background; older snapshots and log segments are deleted once it is read back intact."""
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return
        if self._broken:
            return  # memory may not match the log: only a restart may snapshot it
        try:
            segment = await asyncio.to_thread(self._log.roll)
        except OSError:
            log.exception("index log could not roll over for a snapshot; the log still holds everything")
            if not self._log.healthy:
                self._broken = "the log could not be cut back after a failed roll"
            return
        states = await asyncio.to_thread(lambda: {name: space.state() for name, space in self.spaces.items()})
        self._unsnapshotted = self._unsnapshotted_bytes = 0
        self._snapshot_deadline = deadline or snapshot.Deadline()
        self._snapshot_task = asyncio.get_running_loop().create_task(
            self._write_snapshot(segment, states, self._snapshot_deadline)
        )
        if wait:
            await self._snapshot_task

    async def _write_snapshot(
        self, segment: int, states: dict[str, dict[str, object]], deadline: snapshot.Deadline
    ) -> None:
        started = time.monotonic()
        try:
            folder = await asyncio.to_thread(snapshot.write, self._snapshots, segment, states, deadline)
            problems = await asyncio.to_thread(snapshot.read_back, folder, deadline)
            if problems:
                aside = await asyncio.to_thread(snapshot.set_aside, folder)
                log.error(
                    "index snapshot %d read back damaged (%s), moved to %s; the log still holds everything",
                    segment,
                    "; ".join(map(str, problems)),
                    aside,
                )
                return
            if self._kept is not None:
                await asyncio.to_thread(snapshot.drop_before, self._snapshots, self._kept)
                await asyncio.to_thread(self._log.drop_before, self._kept)
            self._kept = segment
        except snapshot.Abandoned:
            log.warning(
                "index snapshot %d given up after %.1fs (past its deadline); the log still holds everything",
                segment,
                time.monotonic() - started,
            )
            return
        except OSError:
            log.exception("index snapshot %d failed; the log still holds everything", segment)
            return
        log.info("index snapshot %d written and read back in %.1fs", segment, time.monotonic() - started)
