"""Damage found in a shard's data directory, and the refusal to start that it causes."""

from dataclasses import dataclass
from pathlib import Path

from services.common.errors import DataLoss


@dataclass(frozen=True)
class Problem:
    """What is wrong with one file, and where (a byte offset, when there is one)."""

    path: Path
    offset: int | None
    what: str

    def __str__(self) -> str:
        where = f" at byte {self.offset}" if self.offset is not None else ""
        return f"{self.path}{where}: {self.what}"


def recovery_hint(data_dir: Path) -> str:
    return (
        f"run `python -m services.index verify {data_dir}` to list every problem, then "
        f"`python -m services.index salvage {data_dir}` to keep every intact record and set the damaged "
        "files aside (or restore the directory from a backup)"
    )


class Damaged(DataLoss):
    """The data directory cannot be loaded without losing acknowledged writes: the shard refuses to start
    rather than serve with less."""

    def __init__(self, data_dir: Path, problems: list[Problem]) -> None:
        self.problems = problems
        listed = "; ".join(map(str, problems))
        super().__init__(
            f"index data in {data_dir} is damaged, refusing to start (serving would silently lose "
            f"acknowledged writes): {listed}. To recover: {recovery_hint(data_dir)}"
        )
