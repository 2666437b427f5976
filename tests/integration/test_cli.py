"""The `embeddings` command (the console script of the client's distribution, clients/python), run as a real
subprocess against the real system: every command, `--json` for scripts, exit codes (0, 1 with the
status code and message on stderr, 2 for usage errors, 130 for Ctrl-C), TLS and tokens, and `index`:
a folder of photos then a text search that finds the cat, text and CSV files, and a run killed midway
that resumes without sending the acknowledged items again and leaves each id indexed once."""

import csv
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from embeddings_client import Client, Item
from harness.processes import free_port
from tests.system import PHOTOS, TOKEN, SecureGateway, System, ratings, write_crops, write_photos

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).with_name("embeddings")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "embeddings_client.cli"]
# The script imports embeddings_client from this checkout, not from wherever the (shared) venv's editable
# install points: a worktree's tests run its own client.
CHECKOUT = str(Path(__file__).resolve().parents[2])
ENV = {
    **os.environ,
    "EMBEDDINGS_ADDRESS": "",
    "EMBEDDINGS_TOKEN": "",
    "COLUMNS": "160",
    "PYTHONPATH": os.pathsep.join(filter(None, [CHECKOUT, os.environ.get("PYTHONPATH", "")])),
}


def embeddings(
    *args: str | Path, address: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the command; `address` through EMBEDDINGS_ADDRESS (as a shell user would set it)."""
    env = {**ENV, "EMBEDDINGS_ADDRESS": address} if address else ENV
    return subprocess.run(
        [*COMMAND, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def address(system: System) -> str:
    return system.gateway.address


def test_health_and_models(address: str) -> None:
    healthy = embeddings("health", address=address)
    models = ok_json(embeddings("--json", "models", address=address))
    table = embeddings("models", address=address)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING")
    assert {"all-MiniLM-L6-v2", "imagenet-label-space", "efficientnet-lite0"} <= {m["id"] for m in models}
    assert table.returncode == 0 and "all-MiniLM-L6-v2" in table.stdout and "minilm" in table.stdout


def test_a_gateway_that_is_not_there_exits_1_with_the_status(address: str) -> None:
    down = embeddings("--address", f"127.0.0.1:{free_port()}", "--timeout", "3", "health")
    assert down.returncode == 1 and down.stderr.startswith("error: UNAVAILABLE: "), down.stderr
    assert down.stdout == ""


def test_encode_texts_and_images_as_json(address: str, tmp_path: Path) -> None:
    write_photos(tmp_path, ("chelsea", "coffee"))
    texts = ok_json(embeddings("encode", "cli: a cat", "cli: a dog", "--json", address=address))
    photos = ok_json(
        embeddings(
            "--json", "encode", f"@{tmp_path / 'chelsea.jpg'}", f"@{tmp_path / 'coffee.jpg'}", address=address
        )
    )
    short = ok_json(embeddings("--json", "encode", "cli: short", "--dimensions", "8", address=address))
    table = embeddings("encode", "cli: a cat", address=address)
    assert texts["model"]["id"] == "all-MiniLM-L6-v2" and texts["model"]["version"]
    assert [len(row) for row in texts["vectors"]] == [384, 384]
    assert (
        photos["model"]["id"] == "efficientnet-lite0"
        and [len(row) for row in photos["vectors"]] == [1280] * 2
    )
    assert len(short["vectors"][0]) == 8
    assert table.returncode == 0 and "all-MiniLM-L6-v2" in table.stdout and "1 x 384" in table.stdout


def test_encode_bulk_streams_a_file_in_order_to_npy(address: str, tmp_path: Path) -> None:
    notes = tmp_path / "bulk.txt"
    lines = ["bulk: a cat", "bulk: a dog", "bulk: stocks fell", "bulk: an espresso", "bulk: a rocket"]
    notes.write_text("\n".join(lines) + "\n")
    output = tmp_path / "bulk.npy"
    saved = ok_json(
        embeddings("--json", "encode-bulk", notes, "--batch", "2", "--output", output, address=address)
    )
    inline = ok_json(embeddings("--json", "encode-bulk", notes, "--dimensions", "8", address=address))
    one_by_one = ok_json(embeddings("--json", "encode", *lines, address=address))
    photos = tmp_path / "photos"
    write_photos(photos, ("chelsea", "coffee"))
    images = ok_json(embeddings("--json", "encode-bulk", photos, address=address))
    table = embeddings("encode-bulk", notes, address=address)
    assert saved["ids"] == [f"bulk.txt:{n}" for n in range(1, 6)] and saved["shape"] == [5, 384]
    assert saved["model"]["id"] == "all-MiniLM-L6-v2" and saved["output"] == str(output)
    assert np.allclose(np.load(output), np.array(one_by_one["vectors"]), atol=1e-6)
    assert np.array(inline["vectors"]).shape == (5, 8)
    assert images["ids"] == ["chelsea.jpg", "coffee.jpg"] and images["shape"] == [2, 1280]
    assert table.returncode == 0 and "bulk.txt:5" in table.stdout and "5 x 384" in table.stdout


def test_similarity_of_a_text_and_photos(address: str, tmp_path: Path) -> None:
    write_photos(tmp_path, ("chelsea", "coffee"))
    cat, coffee = f"@{tmp_path / 'chelsea.jpg'}", f"@{tmp_path / 'coffee.jpg'}"
    result = ok_json(embeddings("--json", "similarity", "a photo of a cat", cat, coffee, address=address))
    assert result["space"] == "minilm" and result["candidate_model"]["id"] == "imagenet-label-space"
    assert result["scores"][cat] > result["scores"][coffee]


def test_index_the_sample_photos_then_a_text_search_finds_the_cat(
    address: str, system: System, tmp_path: Path
) -> None:
    names = write_photos(tmp_path / "photos")
    indexed = ok_json(
        embeddings(
            "--json",
            "index",
            tmp_path / "photos",
            "--model",
            "imagenet-label-space",
            "--batch",
            "3",
            address=address,
        )
    )
    search = ["search", "a photo of a cat", "--space", "minilm", "--kind", "image", "-k", "3"]
    found = ok_json(embeddings("--json", *search, address=address))
    table = embeddings(*search, address=address)
    again = ok_json(
        embeddings("--json", "index", tmp_path / "photos", "--model", "imagenet-label-space", address=address)
    )
    assert indexed == {
        "indexed": len(PHOTOS),
        "skipped": 0,
        "total": len(PHOTOS),
        "journal": str(tmp_path / "photos.embeddings-index.jsonl"),
    }
    assert found["hits"][0]["id"] == "chelsea.jpg" and found["hits"][0]["payload"] == {"path": "chelsea.jpg"}
    assert found["space"] == "minilm" and {hit["id"] for hit in found["hits"]} <= set(names)
    assert table.returncode == 0 and table.stdout.index("chelsea.jpg") < table.stdout.index(
        found["hits"][1]["id"]
    )
    assert (again["indexed"], again["skipped"]) == (0, len(PHOTOS))


def test_index_a_text_file_and_a_csv(address: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("the rocket lifted off the pad\n\nan espresso, short and strong\n")
    table = tmp_path / "facts.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows(
            [
                ["id", "text", "topic"],
                ["f-cat", "cats sleep most of the day", "pets"],
                ["f-tea", "green tea", "drinks"],
            ]
        )
    from_notes = ok_json(embeddings("--json", "index", notes, address=address))
    from_csv = ok_json(embeddings("--json", "index", table, "--batch", "1", address=address))
    coffee = ok_json(
        embeddings(
            "--json", "search", "a cup of coffee", "--where", "file=notes.txt", "-k", "1", address=address
        )
    )
    pets = ok_json(embeddings("--json", "search", "a kitten", "--where", "topic=pets", address=address))
    deleted = ok_json(embeddings("--json", "delete", "f-tea", "f-none", "--space", "minilm", address=address))
    drinks = ok_json(embeddings("--json", "search", "tea", "--where", "topic=drinks", address=address))
    assert (from_notes["indexed"], from_csv["indexed"]) == (2, 2)
    assert coffee["hits"][0]["id"] == "notes.txt:3"
    assert coffee["hits"][0]["payload"] == {"file": "notes.txt", "line": "3"}
    assert [hit["id"] for hit in pets["hits"]] == ["f-cat"] and pets["hits"][0]["payload"]["topic"] == "pets"
    assert deleted == {"deleted": 1, "not_found": 1} and drinks["hits"] == []


def test_an_index_killed_midway_resumes_without_duplicates(
    address: str, system: System, tmp_path: Path
) -> None:
    folder, journal = tmp_path / "crops", tmp_path / "crops.journal"
    names = write_crops(folder, 64)
    argv = [*COMMAND, "--json", "index", str(folder), "--batch", "1", "--journal", str(journal)]
    process = subprocess.Popen(
        argv, env={**ENV, "EMBEDDINGS_ADDRESS": address}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.005)
    assert process.poll() is None, "index finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    acknowledged = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    assert 3 <= len(acknowledged) < len(names)

    resumed = ok_json(
        embeddings("--json", "index", folder, "--batch", "8", "--journal", journal, address=address)
    )
    journaled = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    assert resumed["skipped"] == len(acknowledged) and resumed["indexed"] == len(names) - len(acknowledged)
    assert sorted(journaled) == names  # each id acknowledged exactly once over both runs
    assert system.indexed("efficientnet-lite0") == len(names)
    found = ok_json(embeddings("--json", "search", f"@{folder / names[0]}", "-k", "100", address=address))
    assert sorted(hit["id"] for hit in found["hits"]) == names
    assert found["hits"][0]["id"] == names[0]


def test_ctrl_c_stops_an_index_with_exit_code_130(address: str, tmp_path: Path) -> None:
    folder, journal = tmp_path / "crops", tmp_path / "crops.journal"
    write_crops(folder, 48, seed=1)
    argv = [*COMMAND, "index", str(folder), "--batch", "1", "--journal", str(journal)]
    process = subprocess.Popen(
        argv,
        env={**ENV, "EMBEDDINGS_ADDRESS": address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (journal.exists() and journal.read_text()):
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr


def test_fit_then_recommend(address: str, tmp_path: Path) -> None:
    file = tmp_path / "ratings.csv"
    with file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "rating"])
        writer.writerows(ratings())
    fitted = ok_json(embeddings("--json", "fit", file, "--model", "cli-mf", address=address))
    shown = embeddings("fit", file, "--model", "cli-mf-2", address=address)
    recommended = ok_json(
        embeddings("--json", "recommend", "u0", "-k", "3", "--model", "cli-mf", address=address)
    )
    table = embeddings("recommend", "u3", "--model", "cli-mf", address=address)
    unknown = embeddings("recommend", "nobody", "--model", "cli-mf", address=address)
    similar = ok_json(
        embeddings("--json", "similar-items", "i3", "-k", "2", "--model", "cli-mf", address=address)
    )
    folded = ok_json(
        embeddings("--json", "fold-in", "i0=5", "i1=4.5", "-k", "3", "--model", "cli-mf", address=address)
    )
    folded_table = embeddings("fold-in", "i0=5", "--model", "cli-mf", address=address)
    item_vectors = ok_json(
        embeddings("--json", "encode", "--items", "i0", "i3", "--model", "cli-mf", address=address)
    )
    user_vectors = ok_json(
        embeddings("--json", "encode", "--users", "u0", "--model", "cli-mf", address=address)
    )
    unknown_item = embeddings("fold-in", "no-such-item=5", "--model", "cli-mf", address=address)
    assert fitted["done"] and fitted["model"]["id"] == "cli-mf" and fitted["interactions"] == 72
    assert fitted["progress"][-1] == {key: value for key, value in fitted.items() if key != "progress"}
    assert shown.returncode == 0 and "epoch 1/" in shown.stdout and "cli-mf-2 (version" in shown.stdout
    assert len(recommended["items"]) == 3 and recommended["model"]["version"] == fitted["model"]["version"]
    assert table.returncode == 0 and "cli-mf" in table.stdout
    assert (
        unknown.returncode == 1
        and unknown.stderr.startswith("error: NOT_FOUND: ")
        and "nobody" in unknown.stderr
    )
    version = fitted["model"]["version"]
    assert [hit["id"] for hit in similar["items"]] and "i3" not in {hit["id"] for hit in similar["items"]}
    assert len(similar["items"]) == 2 and similar["model"]["version"] == version
    assert len(folded["vector"]) == 4 and len(folded["items"]) == 3 and folded["model"]["version"] == version
    assert not {"i0", "i1"} & {hit["id"] for hit in folded["items"]}
    assert folded_table.returncode == 0 and "cli-mf" in folded_table.stdout
    assert np.array(item_vectors["vectors"]).shape == (2, 4) and item_vectors["model"]["version"] == version
    assert np.array(user_vectors["vectors"]).shape == (1, 4)
    assert unknown_item.returncode == 1 and unknown_item.stderr.startswith("error: NOT_FOUND: ")


def test_fit_ease_then_score_and_recommend_with_options(address: str, tmp_path: Path) -> None:
    file = tmp_path / "ratings.csv"
    with file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "rating"])
        writer.writerows(ratings())
    model = ("--model", "cli-ease")
    fitted = ok_json(
        embeddings("--json", "fit", file, *model, "--kind", "ease", "--param", "l2=10", address=address)
    )
    top = ok_json(embeddings("--json", "recommend", "u0", "-k", "3", *model, address=address))
    ids = [hit["id"] for hit in top["items"]]
    scored = ok_json(embeddings("--json", "score", "u0", *ids, *model, address=address))
    excluded = ok_json(
        embeddings("--json", "recommend", "u0", "-k", "3", "--exclude", ids[0], *model, address=address)
    )
    fallback = ok_json(
        embeddings(
            "--json", "recommend", "new-user", "-k", "2", "--fallback-below", "1", *model, address=address
        )
    )
    table = embeddings("recommend", "new-user", "--fallback-below", "1", *model, address=address)
    bad_param = embeddings("fit", file, *model, "--param", "l2", address=address)
    assert fitted["done"] and fitted["kind"] == "ease" and fitted["validation_ndcg_at_10"] >= 0
    assert [hit["id"] for hit in scored["items"]] == ids and not top["fallback"]
    assert np.allclose([hit["score"] for hit in scored["items"]], [hit["score"] for hit in top["items"]])
    assert ids[0] not in {hit["id"] for hit in excluded["items"]}
    assert fallback["fallback"] and len(fallback["items"]) == 2
    assert table.returncode == 0 and "(popularity fallback)" in " ".join(table.stdout.split())
    assert bad_param.returncode == 2 and "NAME=NUMBER" in bad_param.stderr


def test_usage_errors_exit_2(address: str, tmp_path: Path) -> None:
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,words\na,b\n")
    cases = [
        ("nonsense",),
        ("search",),
        ("index", tmp_path / "missing"),
        ("index", bad_csv),
        ("fit", bad_csv),
        ("search", "x", "--where", "novalue"),
        ("encode", "text", f"@{tmp_path / 'missing.jpg'}"),
        ("--cert", tmp_path / "client.crt", "models"),
        ("fold-in", "i0"),
        ("fold-in", "i0=five"),
        ("encode", "--users", "--items", "u0"),
        ("encode-bulk", tmp_path / "missing.txt"),
        ("encode-bulk", bad_csv),
        ("encode-bulk", tmp_path, "--output", tmp_path / "vectors.txt"),
        ("drop-space", "minilm"),  # without --yes: nothing is dropped
    ]
    for case in cases:
        result = embeddings(*case, address=address)
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert result.stderr.strip(), case


def test_drop_space_needs_yes_and_then_the_space_is_gone(address: str) -> None:
    with Client(address) as client:  # a space of one's own vectors
        client.upsert(
            [Item(f"v{n}", vector=row) for n, row in enumerate(np.eye(3, dtype=np.float32))], space="cli-drop"
        )
    refused = embeddings("drop-space", "cli-drop", address=address)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    dropped = ok_json(embeddings("--json", "drop-space", "cli-drop", "--yes", address=address))
    assert dropped == {"dropped": 3, "missing_shards": []}
    again = embeddings("drop-space", "cli-drop", "--yes", address=address)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr


def test_tls_client_certificate_and_token(locked_gateway: SecureGateway) -> None:
    address = locked_gateway.service.address
    tls = [
        "--ca",
        locked_gateway.ca.cert_path,
        "--cert",
        locked_gateway.client.cert,
        "--key",
        locked_gateway.client.key,
    ]
    allowed = ok_json(embeddings("--json", *tls, "--token", TOKEN, "models", address=address))
    from_env = subprocess.run(
        [*COMMAND, *map(str, tls), "encode", "hi"],
        capture_output=True,
        text=True,
        env={**ENV, "EMBEDDINGS_ADDRESS": address, "EMBEDDINGS_TOKEN": TOKEN},
        timeout=60,
        check=False,
    )
    refused = embeddings(*tls, "models", address=address)
    assert "all-MiniLM-L6-v2" in {model["id"] for model in allowed}
    assert from_env.returncode == 0, from_env.stderr
    assert refused.returncode == 1 and refused.stderr.startswith("error: UNAUTHENTICATED: ")


def test_index_restart_forgets_the_journal(address: str, tmp_path: Path) -> None:
    notes = tmp_path / "restart-notes.txt"  # ids restart-notes.txt:<line>: no other test's
    notes.write_text("a heron stood in the shallows\na tram rang its bell\na kettle came to the boil\n")
    journal = tmp_path / "restart.journal"
    run = ["--json", "index", notes, "--journal", journal]
    first = ok_json(embeddings(*run, address=address))
    again = ok_json(embeddings(*run, address=address))
    restarted = ok_json(embeddings(*run, "--restart", address=address))
    assert (first["indexed"], first["skipped"]) == (3, 0)
    assert (again["indexed"], again["skipped"]) == (0, 3)
    assert (restarted["indexed"], restarted["skipped"]) == (3, 0)
    journaled = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    assert sorted(journaled) == [f"restart-notes.txt:{n}" for n in (1, 2, 3)]  # each once: a new journal


def on_a_terminal(argv: list[str], address: str) -> tuple[int, str]:
    """Run the command with its stdout on a pseudo-terminal: its exit code and what it wrote there."""
    controller, terminal = pty.openpty()
    env = {**ENV, "EMBEDDINGS_ADDRESS": address, "TERM": "xterm"}
    process = subprocess.Popen(argv, stdout=terminal, stderr=subprocess.PIPE, env=env)
    os.close(terminal)
    written = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        written += chunk
    os.close(controller)
    return process.wait(60), written.decode(errors="replace")


def test_the_progress_bar_shows_on_a_terminal_only(address: str, tmp_path: Path) -> None:
    notes = tmp_path / "bar-notes.txt"
    notes.write_text("a lighthouse at dusk\nwaves on the rocks\n")
    index = [*COMMAND, "index", str(notes), "--journal", str(tmp_path / "bar.journal"), "--restart"]
    code, shown = on_a_terminal(index, address)
    assert code == 0 and "indexing" in shown and "2/2" in shown, shown
    piped = embeddings(*index[len(COMMAND) :], address=address)
    assert piped.returncode == 0 and "indexed 2" in piped.stdout
    assert "indexing" not in piped.stdout + piped.stderr, piped.stdout
    code, as_json = on_a_terminal([*COMMAND, "--json", *index[len(COMMAND) :]], address)
    assert code == 0 and "indexing" not in as_json and json.loads(as_json)["indexed"] == 2, as_json


@pytest.fixture
def not_serving() -> Iterator[tuple[str, health.HealthServicer]]:
    """A server answering grpc.health.v1 only, NOT_SERVING until the test says otherwise."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_health_exits_1_while_the_service_is_not_serving(
    not_serving: tuple[str, health.HealthServicer],
) -> None:
    address, servicer = not_serving
    down = embeddings("health", address=address)
    assert (down.returncode, down.stdout.strip()) == (1, "NOT_SERVING"), down.stderr
    assert json.loads(embeddings("--json", "health", address=address).stdout) == {"status": "NOT_SERVING"}
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    up = embeddings("health", address=address)
    assert (up.returncode, up.stdout.strip()) == (0, "SERVING"), up.stderr
