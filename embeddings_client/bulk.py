"""Bulk indexing from files: the items of a folder of images, a text file or a CSV file, and the journal
that makes an interrupted run resumable.

There is no "get by id" call, so what has been indexed is what the gateway acknowledged: each
acknowledged id is appended to the journal (one JSON line, flushed at once, so it survives the process
being killed). A rerun skips the journaled ids and sends the rest; a batch that was sent but not yet
acknowledged when the run stopped is sent again, which is safe because an upsert replaces by id.
"""

import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from embeddings_client.messages import Item

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
JOURNAL_SUFFIX = ".embeddings-index.jsonl"

T = TypeVar("T")


def read_items(path: Path) -> list[Item]:
    """A folder: every image file under it (id: its path relative to the folder). A `.txt` file: one item
    per non-empty line (id: `<file name>:<line number>`). A `.csv` file: columns `id` and `text`, any
    other columns going into the payload. Images are read from disk only when they are sent."""
    if path.is_dir():
        return _images(path)
    if path.suffix.lower() == ".txt":
        return _lines(path)
    if path.suffix.lower() == ".csv":
        return _csv_rows(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    raise ValueError(f"{path}: give a folder of images, a .txt file (one text per line) or a .csv (id,text)")


def _images(folder: Path) -> list[Item]:
    files = sorted(
        file for file in folder.rglob("*") if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES
    )
    items = []
    for file in files:
        relative = file.relative_to(folder).as_posix()
        items.append(Item(id=relative, image=file, payload={"path": relative}))
    return items


def _lines(file: Path) -> list[Item]:
    items = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            items.append(
                Item(id=f"{file.name}:{number}", text=line, payload={"file": file.name, "line": str(number)})
            )
    return items


def _csv_rows(file: Path) -> list[Item]:
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "id" not in columns or "text" not in columns:
            raise ValueError(f"{file}: needs the columns id and text (found: {', '.join(columns) or 'none'})")
        items = []
        for row in reader:
            line = reader.line_num
            if not (row["id"] or "").strip() or not (row["text"] or "").strip():
                raise ValueError(f"{file}, line {line}: empty id or text")
            extra = {key: value for key, value in row.items() if key not in ("id", "text") and key}
            items.append(Item(id=row["id"], text=row["text"], payload={"file": file.name, **extra}))
    return items


def default_journal(path: Path) -> Path:
    """`<PATH>.embeddings-index.jsonl` beside the folder or file being indexed."""
    resolved = path.resolve()
    return resolved.with_name(resolved.name + JOURNAL_SUFFIX)


class Journal:
    """The ids the gateway acknowledged, per target (space and model): indexing the same files into
    another space starts from nothing."""

    def __init__(self, path: Path, space: str, model: str) -> None:
        self.path = path
        self._target = {"space": space, "model": model}
        self._torn = False

    def acknowledged(self) -> set[str]:
        """The ids already indexed into this target. A line torn by a kill is ignored (its batch had not
        been recorded; it is sent again)."""
        if not self.path.exists():
            return set()
        text = self.path.read_text(encoding="utf-8")
        self._torn = bool(text) and not text.endswith("\n")
        ids = set()
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (
                isinstance(entry, dict)
                and entry.get("space") == self._target["space"]
                and entry.get("model") == self._target["model"]
            ):
                ids.add(str(entry["id"]))
        return ids

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._torn = False

    def record(self, ids: Iterable[str]) -> None:
        """Append `ids` and flush, so they are on file before the next acknowledgement is read. Not
        fsync'd: a journal line lost in a power cut only means that item is sent again."""
        lines = "".join(json.dumps({"id": item_id, **self._target}) + "\n" for item_id in ids)
        if self._torn:  # end the torn line first, or the next record would be glued to it
            lines, self._torn = "\n" + lines, False
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
