"""The client installed alone: its wheel (clients/python: embeddings_client and the generated contracts),
built from a copy of just what it is made of, installed into a fresh virtual environment with nothing
else of the project, calls a running gateway.

The wheel's dependencies come from the package index this machine's pip is configured with, constrained
to the versions the project pins (requirements-core.txt), so the run is repeatable and pip's cache makes
it quick after the first time.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.system import System, ratings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# What the client's wheel is built from (clients/python/pyproject.toml names them).
CLIENT_SOURCES = ("clients/python", "embeddings_client", "gen/python/embeddings")
# What the fresh environment may hold after installing the wheel: it and its dependencies.
CLIENT_AND_DEPENDENCIES = {
    "embeddings-client",
    "grpcio",
    "grpcio-health-checking",
    "protobuf",
    "numpy",
    "typing-extensions",  # grpcio's
}
CLI_EXTRA = {"rich", "markdown-it-py", "mdurl", "pygments"}
INSTALL_TIMEOUT_S = 600

CALLS = textwrap.dedent(
    """
    import importlib.util, json, sys
    import numpy as np
    from embeddings_client import Client, Item, NotFound

    address, ratings = sys.argv[1], json.loads(sys.argv[2])
    found = {}
    with Client(address, timeout_s=60) as client:
        found["health"] = client.health()
        found["models"] = sorted(model.id for model in client.list_models())
        texts = client.encode_text(["installed: a cat", "installed: a dog"])
        found["encoded"] = [list(texts.vectors.shape), str(texts.vectors.dtype), texts.model.id]
        found["upserted"] = client.upsert(
            [Item(f"alone-{n}", vector=row) for n, row in enumerate(np.eye(3))], space="installed-alone"
        )
        hits = client.search(np.array([0.0, 1.0, 0.1]), space="installed-alone", k=1).hits
        found["nearest"] = [hit.id for hit in hits]
        streamed = list(client.encode_stream([["installed: a cat"], ["installed: a dog"]]))
        found["streamed"] = bool(np.allclose(np.concatenate([s.vectors for s in streamed]), texts.vectors))
        progress = list(client.fit([tuple(row) for row in ratings], model="installed-mf"))
        found["fitted"] = progress[-1].done
        found["recommended"] = len(client.recommend("u0", k=3, model="installed-mf").items)
        found["folded"] = list(client.fold_in({"i0": 5.0}, k=2, model="installed-mf").vector.shape)
        try:
            client.similar_items("no-such-item", model="installed-mf")
        except NotFound as error:
            found["not_found"] = "no-such-item" in error.message
    found["absent"] = [name for name in ("services", "harness", "PIL", "torch", "rich")
                       if importlib.util.find_spec(name) is None]
    print(json.dumps(found))
    """
)


def run(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run where nothing of the project is on sys.path (not in the working directory, whose modules
    `python -c` could import)."""
    result = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False, cwd=env["TMPDIR"]
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment without what would let the project in (PYTHONPATH) or leak the
    venv of the tests (VIRTUAL_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "EMBEDDINGS_ADDRESS": "", "EMBEDDINGS_TOKEN": "", "TMPDIR": str(home)}


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client's wheel, built without network (setuptools of this venv) from a copy of its sources."""
    copy, dist = tmp_path_factory.mktemp("client-src"), tmp_path_factory.mktemp("client-dist")
    for part in CLIENT_SOURCES:
        shutil.copytree(
            ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
        )
    pip = [sys.executable, "-m", "pip"]
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(copy / "clients/python")],
        clean_env(copy),
    )
    (wheel,) = dist.glob("embeddings_client-*.whl")
    return wheel


def read_lines(name: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in (ROOT / name).read_text().splitlines()]


def installed(python: Path, env: dict[str, str]) -> set[str]:
    listing = run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, json; "
            "print(json.dumps(sorted({d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()})))",
        ],
        env,
    )
    return set(json.loads(listing.stdout))


def test_the_client_installed_alone_in_a_fresh_venv_calls_the_gateway(
    client_wheel: Path, system: System, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    env = clean_env(tmp_path)
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env)
    python = venv / "bin" / "python"
    assert installed(python, env) == set(), "a fresh venv should hold nothing"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    constraints = ["--constraint", str(ROOT / "requirements-core.txt")]
    run([*pip, *constraints, str(client_wheel)], env, timeout=INSTALL_TIMEOUT_S)
    assert installed(python, env) == CLIENT_AND_DEPENDENCIES

    calls = run([str(python), "-c", CALLS, system.gateway.address, json.dumps(ratings())], env, timeout=300)
    found = json.loads(calls.stdout.strip().splitlines()[-1])
    assert found["health"] == "SERVING" and "all-MiniLM-L6-v2" in found["models"]
    assert found["encoded"] == [[2, 384], "float32", "all-MiniLM-L6-v2"] and found["streamed"]
    assert found["upserted"] == 3 and found["nearest"] == ["alone-1"]
    assert found["fitted"] and found["recommended"] == 3 and found["folded"] == [4]
    assert found["not_found"]
    assert found["absent"] == ["services", "harness", "PIL", "torch", "rich"]

    # the command: without its extra it says what to install; with it, it calls the gateway
    script = venv / "bin" / "embeddings"
    bare = subprocess.run(
        [str(script), "health"], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path
    )
    assert bare.returncode == 1 and "pip install 'embeddings-client[cli]'" in bare.stderr, bare.stderr
    pinned = [line for line in read_lines("requirements-dev.txt") if line.startswith("rich==")]
    assert pinned, "requirements-dev.txt pins no rich"
    rich = tmp_path / "rich-constraint.txt"  # only this pin: requirements-dev.txt -r's the model stack
    rich.write_text(pinned[0] + "\n")
    run(
        [*pip, *constraints, "--constraint", str(rich), f"{client_wheel}[cli]"],
        env,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert installed(python, env) == CLIENT_AND_DEPENDENCIES | CLI_EXTRA
    models = run([str(script), "--json", "--address", system.gateway.address, "models"], env)
    assert "all-MiniLM-L6-v2" in {model["id"] for model in json.loads(models.stdout)}
