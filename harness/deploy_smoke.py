"""The compose stack, for real: `make deploy-smoke` (after `make images`, which it runs).

Brings deploy/compose.yaml up as its own project (`embeddings-smoke`, fresh volumes, free ports, a backend
token the workers and shards require and a bearer token the gateway requires), waits until every service
is healthy, then through the containerised gateway: Encode (text and image), Similarity, Upsert + Search
across modalities, Fit + Recommend; a shard killed in the middle of a bulk upsert (the search is partial
and names it; once restarted, every acknowledged item is back); the user-item worker killed in the middle
of a Fit (the served version is unchanged); the whole stack taken down and brought up again (the items
and the trained model survive in the volumes); then `down`. Prints each step with its outcome and time,
and exits 1 on the first failure (after printing the failing services' logs and taking the stack down).

Usage: python -m harness.deploy_smoke [--keep] [--project NAME]   (--keep: leave the stack up at the end)
"""

import argparse
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embeddings_client import Client, EmbeddingsError, Item, Unauthenticated, UpsertAck

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
IMAGES_ENV = ROOT / "build" / "images.env"
SERVICES = ("redis", "text", "image", "index-0", "index-1", "useritem", "gateway")
HEALTHY_WITHIN_S = 900.0
CALL_TIMEOUT_S = 120.0
MODEL = "smoke-mf"
BULK_SPACE = "smoke-bulk"


class SmokeFailure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


# --- docker and compose ---------------------------------------------------------------------------------


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where the plugin is installed, else v1 (`docker-compose`)."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SmokeFailure("neither `docker compose` nor `docker-compose` is installed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        raise SmokeFailure(f"{path} is missing: run `make images` (deploy/images.sh) first")
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    compose: list[str] = field(default_factory=compose_command)

    def run(
        self, *args: str, timeout: float = 600, check_rc: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [*self.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        result = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        if check_rc and result.returncode != 0:
            raise SmokeFailure(f"`{' '.join(argv[len(self.compose) :])}` failed:\n{result.stderr[-3000:]}")
        return result

    def containers(self) -> dict[str, str]:
        """service -> container id, of this project's containers (running or not)."""
        listing = subprocess.run(
            [
                "docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
                "--format", '{{.ID}} {{.Label "com.docker.compose.service"}}',
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        found = {}
        for line in listing.stdout.splitlines():
            if line.strip():
                container, service = line.split(maxsplit=1)
                found[service] = container
        return found

    def health(self) -> dict[str, str]:
        """service -> its container's health status (healthy, starting, unhealthy) or state if not running."""
        found = {}
        for service, container in self.containers().items():
            state = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", container],
                capture_output=True, text=True, check=False,
            ).stdout.split()  # fmt: skip
            found[service] = state[1] if len(state) > 1 and state[0] == "running" else (state or ["gone"])[0]
        return found

    def wait_healthy(self, services: tuple[str, ...], since: float, timeout_s: float) -> dict[str, float]:
        """Seconds from `since` until each service was first seen healthy; fails naming those that were not."""
        became: dict[str, float] = {}
        deadline = since + timeout_s
        while time.monotonic() < deadline:
            status = self.health()
            for service in services:
                if service not in became and status.get(service) == "healthy":
                    became[service] = time.monotonic() - since
            if len(became) == len(services):
                return became
            failed = [s for s in services if status.get(s) in ("exited", "dead", "unhealthy")]
            if failed and time.monotonic() - since > 30:
                raise SmokeFailure(f"not healthy: {', '.join(f'{s} ({status[s]})' for s in failed)}")
            time.sleep(1)
        waiting = [f"{s} ({self.health().get(s, 'no container')})" for s in services if s not in became]
        raise SmokeFailure(f"not healthy within {timeout_s:.0f} s: {', '.join(waiting)}")

    def docker(self, action: str, service: str) -> None:
        container = self.containers()[service]
        subprocess.run(["docker", action, container], capture_output=True, text=True, check=True)

    def logs(self, services: list[str], lines: int = 40) -> str:
        return self.run("logs", "--no-color", "--tail", str(lines), *services, check_rc=False).stdout


# --- the report -----------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.steps = 0

    @contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        """Times a step; the block calls `note(detail)` to say what it saw. Prints `ok` or `FAIL`."""
        details: list[str] = []
        began = time.monotonic()
        try:
            yield details.append
        except (SmokeFailure, EmbeddingsError, subprocess.SubprocessError, OSError) as error:
            print(f"FAIL  {name:<42} {time.monotonic() - began:6.1f} s  {error}", flush=True)
            raise SmokeFailure(f"{name}: {error}") from error
        self.steps += 1
        print(f"ok    {name:<42} {time.monotonic() - began:6.1f} s  {'; '.join(details)}", flush=True)


# --- what the steps send --------------------------------------------------------------------------------


def photo(name: str) -> bytes:
    """A scikit-image sample photo (CC0) as JPEG bytes."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def ratings(users: int, items: int, per_user: int, seed: int) -> list[tuple[str, str, float]]:
    rng = np.random.default_rng(seed)
    return [
        (f"u{user}", f"i{(user * 7 + step) % items}", float(rng.integers(1, 6)))
        for user in range(users)
        for step in range(per_user)
    ]


CAPTIONS = {
    "cap-cat": "a cat curled up asleep on a sofa",
    "cap-coffee": "an espresso in a white cup",
    "cap-rocket": "a rocket lifting off its launch pad",
    "cap-horse": "a horse grazing in a field",
    **{f"cap-{n}": f"smoke test note number {n} about the weather" for n in range(12)},
}
PHOTOS = ("chelsea", "coffee", "rocket")


def all_minilm_ids(client: Client) -> tuple[set[str], Any]:
    found = client.search("a kitten", space="minilm", k=100, timeout_s=CALL_TIMEOUT_S)
    return {hit.id for hit in found.hits}, found


# --- the scenario ---------------------------------------------------------------------------------------


def scenario(stack: Stack, report: Report, address: str, token: str) -> None:
    with report.step("compose up -d (fresh volumes)") as note:
        stack.run("down", "-v", "--remove-orphans", timeout=300)
        began = time.monotonic()
        up = subprocess.Popen(
            [*stack.compose, "-p", stack.project, "-f", str(COMPOSE_FILE), "up", "-d"],
            env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        note(f"{stack.compose[-1]} up -d started")

    with report.step("every service healthy") as note:
        became = stack.wait_healthy(SERVICES, began, HEALTHY_WITHIN_S)
        output, _ = up.communicate(timeout=120)
        check(up.returncode == 0, f"compose up exited {up.returncode}:\n{output[-2000:]}")
        note(", ".join(f"{s} {became[s]:.0f} s" for s in SERVICES))
        note(f"time to healthy {max(became.values()):.0f} s")

    client = Client(address, token=token, timeout_s=CALL_TIMEOUT_S)
    with report.step("health and models through the gateway") as note:
        check(client.health() == "SERVING", "the gateway is not SERVING")
        models = {model.id: model for model in client.list_models()}
        check({"all-MiniLM-L6-v2", "efficientnet-lite0", "imagenet-label-space"} <= set(models), str(models))
        note(f"SERVING; models {', '.join(sorted(models))}")

    with report.step("tokens: caller and backend") as note:
        with Client(address, timeout_s=30) as anonymous:
            try:
                anonymous.list_models()
                raise SmokeFailure("a caller without the token was served")
            except Unauthenticated:
                note("the gateway refuses a caller without its token")
        probe = (
            "import grpc; from embeddings.v1 import encoder_pb2 as e, encoder_pb2_grpc as g\n"
            "c = grpc.insecure_channel('text:50061')\n"
            "try:\n    g.EncoderStub(c).ListModels(e.ListModelsRequest(), timeout=10); print('SERVED')\n"
            "except grpc.RpcError as x:\n    print(x.code().name)"
        )
        refused = stack.run("exec", "-T", "gateway", "python", "-c", probe).stdout.strip()
        check(
            refused == "UNAUTHENTICATED",
            f"the text worker answered a call without the backend token: {refused}",
        )
        note("the text worker refuses a call without the backend token")

    photos = {name: photo(name) for name in PHOTOS}
    with report.step("Encode text and image") as note:
        texts = client.encode_text(["a cat sits on the mat", "stocks fell"])
        image = client.encode_image(photos["chelsea"])
        check(texts.vectors.shape == (2, 384) and texts.model.id == "all-MiniLM-L6-v2", str(texts.model))
        check(image.vectors.shape == (1, 1280) and image.model.id == "efficientnet-lite0", str(image.model))
        again = client.encode_text(["a cat sits on the mat", "stocks fell"])
        check(again.cached == (True, True), f"second encode not from the cache: {again.cached}")
        note(f"text {texts.vectors.shape} {texts.model.id}@{texts.model.version}, cached the second time")
        note(f"image {image.vectors.shape} {image.model.id}@{image.model.version}")

    with report.step("Similarity (a text against photos)") as note:
        scores = client.similarity(["a photo of a cat"], [photos["chelsea"], photos["coffee"]])
        cat, coffee = (float(x) for x in scores.scores[0])
        check(cat > coffee, f"the cat photo scored {cat:.3f}, the coffee {coffee:.3f}")
        note(f"space {scores.space}: cat {cat:.3f} > coffee {coffee:.3f}")

    with report.step("Upsert + Search across modalities") as note:
        items = [
            Item(f"photo-{name}", image=data, payload={"kind": "photo"}) for name, data in photos.items()
        ]
        items += [Item(key, text=text, payload={"kind": "caption"}) for key, text in CAPTIONS.items()]
        upserted = client.upsert(items[:3], model="imagenet-label-space") + client.upsert(items[3:])
        check(upserted == len(items), f"upserted {upserted} of {len(items)}")
        kitten = client.search("a kitten", k=3, kinds=["image"], space="minilm")
        check(bool(kitten.hits) and kitten.hits[0].id == "photo-chelsea", f"a kitten found {kitten.hits}")
        espresso = client.search(photos["coffee"], model="imagenet-label-space", k=1, kinds=["text"])
        check(espresso.hits[0].id == "cap-coffee", f"the coffee photo found {espresso.hits}")
        note(f"{upserted} items; 'a kitten' -> {kitten.hits[0].id}; coffee photo -> {espresso.hits[0].id}")

    train = ratings(users=40, items=25, per_user=8, seed=5)
    with report.step("Fit + Recommend") as note:
        progress = list(client.fit(train, model=MODEL))
        last = progress[-1]
        check(last.done and last.model is not None, f"Fit ended with {last}")
        assert last.model is not None
        version = last.model.version
        recommended = client.recommend("u0", k=5, model=MODEL)
        check(len(recommended.items) == 5 and recommended.model.version == version, str(recommended))
        seen = {item for user, item, _ in train if user == "u0"}
        check(not seen & {hit.id for hit in recommended.items}, "recommended an item u0 has seen")
        similar = client.similar_items("i1", k=3, model=MODEL)
        folded = client.fold_in({"i1": 5.0, "i2": 4.0}, k=3, model=MODEL)
        check(len(similar.items) == 3 and len(folded.items) == 3, "SimilarItems/FoldIn answered short")
        note(f"version {version} ({last.interactions} ratings, {len(progress)} epochs)")
        note(f"u0 -> {', '.join(hit.id for hit in recommended.items)}")

    before, _ = all_minilm_ids(client)
    with report.step("kill a shard mid-upsert: partial, then back") as note:
        acked: list[UpsertAck] = []
        failure: list[BaseException] = []
        rng = np.random.default_rng(11)
        batches = [[Item(f"bulk-{b}-{i}", vector=rng.normal(size=8)) for i in range(5)] for b in range(120)]

        def slowly() -> Iterator[list[Item]]:
            for batch in batches:
                time.sleep(0.05)
                yield batch

        def bulk() -> None:
            try:
                acked.extend(client.upsert_stream(slowly(), space=BULK_SPACE, timeout_s=300))
            except BaseException as error:  # recorded: the stream is expected to fail once a shard dies
                failure.append(error)

        writer = threading.Thread(target=bulk)
        writer.start()
        while len(acked) < 10 and writer.is_alive():
            time.sleep(0.01)
        stack.docker("kill", "index-1")
        writer.join(300)
        check(not writer.is_alive(), "the bulk upsert did not end after the shard was killed")
        ended = f"the upsert stream ended with {type(failure[0]).__name__}" if failure else "no error"
        note(f"{len(acked)} of {len(batches)} batches acknowledged before the kill; {ended}")
        partial = client.search("a kitten", space="minilm", k=100)
        check(partial.partial, "the search was not partial with a shard down")
        check(
            any("index-1" in shard for shard in partial.missing_shards), f"missing {partial.missing_shards}"
        )
        lost = before - {hit.id for hit in partial.hits}
        check(bool(lost), "no item was missing with a shard down")
        note(f"partial, missing {', '.join(partial.missing_shards)} ({len(lost)} items not found)")
        restarted = time.monotonic()
        stack.docker("start", "index-1")
        stack.wait_healthy(("index-1",), restarted, 300)
        after, back = all_minilm_ids(client)
        check(
            not back.partial and after == before,
            f"after the restart: partial {back.partial}, {len(before - after)} missing",
        )
        ids = {item_id for ack in acked for item_id in ack.ids}
        everything = client.search(np.ones(8), space=BULK_SPACE, k=1000)
        check(
            ids <= {hit.id for hit in everything.hits},
            f"acknowledged items lost: {len(ids - {hit.id for hit in everything.hits})}",
        )
        note(
            f"back in {time.monotonic() - restarted:.0f} s with all {len(after)} items and all {len(ids)} acknowledged bulk items"
        )

    with report.step("kill the user-item worker mid-Fit") as note:
        big = ratings(users=20000, items=2000, per_user=50, seed=9)
        epochs: list[Any] = []
        failed: list[BaseException] = []

        def fit() -> None:
            try:
                # MF: epochs to be killed between (an EASE Fit of 2,000 items reports once, then is done)
                for step in client.fit(big, model=MODEL, kind="mf", timeout_s=600):
                    epochs.append(step)
            except BaseException as error:  # expected: the worker is killed
                failed.append(error)

        trainer = threading.Thread(target=fit)
        trainer.start()
        while not epochs and trainer.is_alive():
            time.sleep(0.05)
        check(bool(epochs) and not epochs[-1].done, "the Fit ended before it could be interrupted")
        stack.docker("kill", "useritem")
        trainer.join(120)
        check(bool(failed), "the Fit did not fail when its worker was killed")
        note(
            f"killed after epoch {epochs[-1].epoch}/{epochs[-1].epochs}; the Fit ended with {type(failed[0]).__name__}"
        )
        restarted = time.monotonic()
        stack.docker("start", "useritem")
        stack.wait_healthy(("useritem",), restarted, 300)
        served = client.recommend("u0", k=5, model=MODEL)
        check(served.model.version == version, f"served version {served.model.version}, expected {version}")
        note(f"back in {time.monotonic() - restarted:.0f} s serving version {version}, unchanged")

    client.close()
    with report.step("restart the whole stack (down, up -d)") as note:
        stack.run("down", timeout=300)
        began = time.monotonic()
        stack.run("up", "-d", timeout=HEALTHY_WITHIN_S)
        became = stack.wait_healthy(SERVICES, began, HEALTHY_WITHIN_S)
        note(f"time to healthy {max(became.values()):.0f} s (volumes kept)")

    client = Client(address, token=token, timeout_s=CALL_TIMEOUT_S)
    with report.step("items and model survived the restart") as note:
        after, found = all_minilm_ids(client)
        check(not found.partial and after == before, f"{len(before - after)} of {len(before)} items lost")
        kitten = client.search("a kitten", k=1, kinds=["image"], space="minilm")
        check(kitten.hits[0].id == "photo-chelsea", str(kitten.hits))
        served = client.recommend("u0", k=5, model=MODEL)
        check(served.model.version == version, f"version {served.model.version}, expected {version}")
        again = client.encode_text(["a cat sits on the mat"])
        note(f"{len(after)} items, model {MODEL} version {version}")
        note(f"cache kept (Redis append-only file): {again.cached == (True,)}")
    client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--project", default="embeddings-smoke", help="compose project name")
    args = parser.parse_args()

    images = read_env_file(IMAGES_ENV)
    port, metrics = free_port(), free_port()
    token, backend_token = secrets.token_hex(16), secrets.token_hex(16)
    work = ROOT / "build" / "smoke"
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "fit").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **images,
        "EMBEDDINGS_PORT": str(port),
        "EMBEDDINGS_METRICS_PORT": str(metrics),
        "GATEWAY_AUTH_TOKENS": token,
        "EMBEDDINGS_BACKEND_TOKEN": backend_token,
        "MODELS_DIR": str(work / "models"),
        "FIT_DIR": str(work / "fit"),
    }
    stack = Stack(args.project, env)
    tag = images.get("EMBEDDINGS_TAG", "?")
    print(
        f"deploy smoke test: {' '.join(stack.compose)}, project {args.project}, gateway localhost:{port}, "
        f"images embeddings/*:{tag} on {images.get('PYTHON_IMAGE')}, redis {images.get('REDIS_IMAGE')}",
        flush=True,
    )
    report = Report()
    try:
        scenario(stack, report, f"localhost:{port}", token)
    except (SmokeFailure, KeyboardInterrupt) as error:
        print(f"\nFAILED after {report.steps} steps, {time.monotonic() - report.started:.0f} s: {error}")
        unhealthy = [s for s, status in stack.health().items() if status != "healthy"]
        print(f"--- services not healthy: {unhealthy or 'none'}; their last log lines:")
        print(stack.logs(unhealthy or ["gateway"]))
        if not args.keep:
            stack.run("down", "-v", "--remove-orphans", timeout=300, check_rc=False)
        return 1
    with report.step("compose down -v") as note:
        if args.keep:
            note("--keep: left up")
        else:
            stack.run("down", "-v", "--remove-orphans", timeout=300)
            left = stack.containers()
            check(not left, f"containers left: {left}")
            note("containers and volumes removed")
    print(f"\nPASSED: {report.steps} steps in {time.monotonic() - report.started:.0f} s")
    if args.keep:  # what it takes to call the stack left up, and to take it down
        print(json.dumps({"project": args.project, "gateway": f"localhost:{port}", "token": token}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
