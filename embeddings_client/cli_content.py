"""The CLI's item content: `ITEM=CONTENT` arguments and CSV files of item_id,text[,image] (fold-in-items,
fit --content). Bad local input is a ValueError: the CLI's usage error, exit code 2."""

import csv
from pathlib import Path

from embeddings_client.cold_start import Content
from embeddings_client.results import ContentMap


def content_pair(pair: str) -> tuple[str, Content]:
    """`ITEM=text`, or `ITEM=@path` of an image file."""
    item, separator, content = pair.partition("=")
    if not separator or not item or not content:
        raise ValueError(f"fold-in-items takes ITEM=TEXT or ITEM=@IMAGE_PATH pairs, not {pair!r}")
    return item, Path(content[1:]) if content.startswith("@") else content


def content_file(file: Path) -> dict[str, Content]:
    """Rows of a CSV with columns item_id and text and/or image (an image file's path, relative to the
    CSV's folder): each item's text and image, both when both are given."""
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if "item_id" not in columns or not columns & {"text", "image"}:
            raise ValueError(
                f"{file}: needs the columns item_id and text and/or image (found: {', '.join(sorted(columns)) or 'none'})"
            )
        contents: dict[str, Content] = {}
        for row in reader:
            parts: list[str | Path] = []
            if row.get("text"):
                parts.append(row["text"])
            if row.get("image"):
                parts.append(file.parent / row["image"])
            if not row.get("item_id") or not parts:
                raise ValueError(f"{file}, line {reader.line_num}: needs an item_id and a text or an image")
            contents[row["item_id"]] = parts if len(parts) > 1 else parts[0]
    return contents


def content_map_text(learnt: ContentMap) -> str:
    return (
        f"content map from space {learnt.space} ({learnt.dimension}-d): {learnt.items} items, l2 {learnt.l2:g}, "
        f"leave-one-out R^2 {learnt.r2:.3f}"
    )
