"""A queue that takes items from its callers in turn: one caller with many items waiting does not make
another caller's item wait behind all of them."""

import collections
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RoundRobin(Generic[T]):
    """Items queued per caller, in order; `pop` takes the oldest item of the next caller in turn."""

    def __init__(self) -> None:
        self._queues: collections.OrderedDict[str, collections.deque[T]] = collections.OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, caller: str, item: T) -> None:
        self._queues.setdefault(caller, collections.deque()).append(item)
        self._size += 1

    def peek(self) -> T:
        """The item `pop` would take next, left in place."""
        return next(iter(self._queues.values()))[0]

    def pop(self) -> T:
        """The next caller's oldest item; that caller then waits for every other caller's turn."""
        caller, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        if queue:
            self._queues.move_to_end(caller)
        else:
            del self._queues[caller]
        self._size -= 1
        return item

    def heads(self) -> Iterator[T]:
        """Each caller's oldest item."""
        return (queue[0] for queue in self._queues.values())

    def drain(self) -> Iterator[T]:
        """Every item, emptying the queue."""
        while self._size:
            yield self.pop()
