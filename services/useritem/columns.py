"""Compact storage for a Fit's interactions while they arrive: ids numbered as they first appear, and
numpy columns that grow by doubling, so that an interaction costs a few bytes instead of the Python
objects (strings, floats, list slots) of each one."""

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd


class GrowingColumn:
    """A numpy array appended to in chunks; its capacity doubles when full (amortised O(1) per value,
    at most twice the values' size, three times for the moment of a copy)."""

    def __init__(self, dtype: type[np.generic], capacity: int = 1024) -> None:
        self._data = np.empty(capacity, dtype=dtype)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def extend(self, values: np.ndarray) -> None:
        end = self._size + len(values)
        if end > len(self._data):
            grown = np.empty(max(end, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : end] = values
        self._size = end

    def values(self) -> np.ndarray:
        """The values so far (a view: no copy)."""
        return self._data[: self._size]


# A new id's problem (a description of what is wrong with it), or None when it is acceptable.
IdCheck = Callable[[str], str | None]


class IdNumbering:
    """Distinct ids, numbered 0, 1, ... in order of first appearance; each id is kept once."""

    def __init__(self, check: IdCheck) -> None:
        self._check = check
        self._codes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._codes)

    def ids(self) -> list[str]:
        """Every id, by its number."""
        return list(self._codes)

    def number(self, values: Sequence[str]) -> tuple[np.ndarray, tuple[int, str] | None]:
        """The numbers (int32) of `values`, new ids numbered; and the first problem: (position in
        `values`, description) of the first new id that fails the check (then the numbers are not
        usable), or None."""
        local, uniques = pd.factorize(np.asarray(values, dtype=object))
        numbers = np.empty(len(uniques), dtype=np.int32)
        codes = self._codes
        for position, value in enumerate(uniques):
            code = codes.get(value)
            if code is None:
                problem = self._check(value)
                if problem is not None:
                    # uniques come in order of first appearance: this is the earliest bad id
                    return numbers, (int(np.argmax(local == position)), problem)
                code = codes[value] = len(codes)
            numbers[position] = code
        return numbers[local], None
