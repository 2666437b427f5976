"""Seeded storage faults for an index shard's data directory: flipped bits and files cut short, in its log
segments, its COMMITTED marker and its snapshot files."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Fault:
    path: Path
    kind: str  # "flip": bits flipped at `offsets`; "truncate": cut to `offsets[0]` bytes
    offsets: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.kind} {self.path.name} at {list(self.offsets)}"


def data_files(data_dir: Path) -> list[Path]:
    return sorted(path for path in data_dir.rglob("*") if path.is_file() and path.stat().st_size)


def inject(data_dir: Path, seed: int) -> list[Fault]:
    """Damage `data_dir` as seed `seed` says: one file flipped (1 to 3 bits) or cut short at a random
    offset, or (every fourth seed) bits flipped in two or three files. Never a cut together with other
    damage: a log cut short is found by the marker, and a second fault could be in the marker."""
    rng = np.random.default_rng(seed)
    files = data_files(data_dir)
    if seed % 4 == 3:
        chosen = rng.choice(len(files), size=min(len(files), int(rng.integers(2, 4))), replace=False)
        return [_flip(files[int(number)], rng) for number in chosen]
    path = files[int(rng.integers(len(files)))]
    if rng.random() < 0.5:
        return [_flip(path, rng)]
    size = path.stat().st_size
    keep = int(rng.integers(size))
    with path.open("r+b") as file:
        file.truncate(keep)
    return [Fault(path, "truncate", (keep,))]


def _flip(path: Path, rng: np.random.Generator) -> Fault:
    data = bytearray(path.read_bytes())
    offsets = tuple(sorted({int(rng.integers(len(data))) for _ in range(int(rng.integers(1, 4)))}))
    for offset in offsets:
        data[offset] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))
    return Fault(path, "flip", offsets)
