"""What `embeddings index` reads from a folder, a text file and a CSV, and its resume journal."""

import json
from pathlib import Path

import pytest

from embeddings_client import messages
from embeddings_client.bulk import Journal, batched, default_journal, read_items
from tests import image_files


def test_a_folder_gives_its_image_files_with_relative_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.JPG").write_bytes(image_files.one_pixel("JPEG"))
    (tmp_path / "sub" / "b.png").write_bytes(image_files.one_pixel("PNG"))
    (tmp_path / "notes.md").write_text("not an image")
    items = read_items(tmp_path)
    assert [(item.id, item.payload) for item in items] == [
        ("a.JPG", {"path": "a.JPG"}),
        ("sub/b.png", {"path": "sub/b.png"}),
    ]
    assert items[1].to_proto().input.image == image_files.one_pixel("PNG")  # read when sent


def test_a_text_file_gives_one_item_per_non_empty_line(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("first\n\n  \nfourth\n")
    assert [(item.id, item.text) for item in read_items(file)] == [
        ("notes.txt:1", "first"),
        ("notes.txt:4", "fourth"),
    ]


def test_a_csv_gives_id_and_text_and_the_other_columns_as_payload(tmp_path: Path) -> None:
    file = tmp_path / "facts.csv"
    file.write_text("id,text,topic\nf1,cats sleep,pets\n")
    (item,) = read_items(file)
    assert (item.id, item.text, item.payload) == ("f1", "cats sleep", {"file": "facts.csv", "topic": "pets"})
    file.write_text("name,words\na,b\n")
    with pytest.raises(ValueError, match="id and text"):
        read_items(file)
    file.write_text("id,text\nf1,\n")
    with pytest.raises(ValueError, match="line 2"):
        read_items(file)


def test_other_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_items(tmp_path / "missing.json")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(ValueError, match="folder of images"):
        read_items(tmp_path / "data.json")


def test_the_journal_keeps_ids_per_target_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = default_journal(tmp_path / "photos")
    assert path == tmp_path / "photos.embeddings-index.jsonl"
    journal = Journal(path, "minilm", "")
    journal.record(["a", "b"])
    Journal(path, "other", "").record(["c"])
    with path.open("a") as handle:
        handle.write('{"id": "d", "spa')  # a kill in the middle of a write
    reopened = Journal(path, "minilm", "")
    assert reopened.acknowledged() == {"a", "b"}
    reopened.record(["e"])
    assert reopened.acknowledged() == {"a", "b", "e"}
    assert json.loads(path.read_text().splitlines()[-1]) == {"id": "e", "space": "minilm", "model": ""}
    reopened.clear()
    assert reopened.acknowledged() == set()


def test_batches_and_items() -> None:
    assert [list(batch) for batch in batched([1, 2, 3, 4, 5], 2)] == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="exactly one"):
        messages.Item("x", text="a", vector=[1.0])
    with pytest.raises(ValueError, match="exactly one"):
        messages.Item("x")


def test_fit_requests_name_the_model_first_then_carry_chunks() -> None:
    rows = [("u1", "i1", 4.0), ("u1", "i2", 3.0, 1700000000), ("u2", "i1", 5.0)]
    requests = list(messages.fit(rows, "movies", False, (1.0, 5.0), chunk_size=2))
    assert [len(request.interactions) for request in requests] == [2, 1]
    assert (requests[0].model, requests[0].rating_min, requests[0].rating_max) == ("movies", 1.0, 5.0)
    assert requests[1].model == "" and requests[0].interactions[1].timestamp == 1700000000
    assert len(list(messages.fit([], "movies", False, None, 2))) == 1  # the service answers an empty Fit
    # a declared range is sent whole, a bound of 0 included (presence on the wire); none: no scale at all
    (declared,) = messages.fit(rows[:1], "movies", False, (0.0, 1.0), chunk_size=2)
    assert declared.HasField("rating_min") and declared.HasField("rating_max")
    assert (declared.rating_min, declared.rating_max) == (0.0, 1.0)
    (default,) = messages.fit(rows[:1], "movies", False, None, chunk_size=2)
    assert not default.HasField("rating_min") and not default.HasField("rating_max")
