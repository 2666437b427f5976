"""`make run`: Redis, the text, image and user-item workers, two index shards and the gateway on this
machine, on fixed ports; Ctrl-C stops all.

Ports (override with the environment): gateway 50051 (GATEWAY_PORT), text worker 50061 (TEXT_PORT), image
worker 50062 (IMAGE_PORT), user-item worker 50063 (USERITEM_PORT), index shards 50071 and 50072
(INDEX_PORT, INDEX_PORT + 1), Redis 6379 (REDIS_PORT; an already running Redis there is used as it is),
metrics 9150 / 9161 / 9162 / 9163 / 9171 / 9172. Only the gateway listens on every address (0.0.0.0); the
workers, shards and Redis listen on loopback (127.0.0.1), where only this machine can reach them: the
gateway's authentication cannot be bypassed through their ports from elsewhere. Indexed items are kept in data/index-0 and data/index-1,
trained user-item models in data/useritem, and Fit reads interaction files from data/fit (all under
DATA_DIR), so everything survives a restart.
"""

import os
import signal
import sys
import time
from pathlib import Path

from harness.processes import (
    RedisServer,
    Service,
    gateway,
    image_worker,
    index_shard,
    redis_answers,
    text_worker,
    useritem_worker,
)


def main() -> None:
    log_dir = Path(os.environ.get("LOG_DIR", "build/logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    redis_port = int(os.environ.get("REDIS_PORT", "6379"))
    text_port = int(os.environ.get("TEXT_PORT", "50061"))
    image_port = int(os.environ.get("IMAGE_PORT", "50062"))
    gateway_port = int(os.environ.get("GATEWAY_PORT", "50051"))
    useritem_port = int(os.environ.get("USERITEM_PORT", "50063"))
    index_port = int(os.environ.get("INDEX_PORT", "50071"))
    data_dir = Path(os.environ.get("DATA_DIR", "data"))
    (data_dir / "fit").mkdir(parents=True, exist_ok=True)

    children: list[RedisServer | Service] = []
    if not redis_answers(redis_port):
        redis = RedisServer(redis_port, log_dir)
        redis.start()
        children.append(redis)
    backends = [
        text_worker({"TEXT_METRICS_PORT": "9161"}, log_dir, text_port),
        image_worker({"IMAGE_METRICS_PORT": "9162"}, log_dir, image_port),
        useritem_worker(
            data_dir / "useritem",
            {"USERITEM_METRICS_PORT": "9163"},
            log_dir,
            useritem_port,
            data_dir / "fit",
        ),
        *(
            index_shard(
                data_dir / f"index-{number}",
                {"INDEX_METRICS_PORT": str(9171 + number)},
                log_dir,
                index_port + number,
                f"index-{number}",
            )
            for number in range(2)
        ),
    ]
    gate = gateway(
        [backend.address for backend in backends[:2]],
        f"redis://127.0.0.1:{redis_port}/0",
        {"GATEWAY_HOST": "0.0.0.0", "GATEWAY_METRICS_PORT": "9150"},
        log_dir,
        gateway_port,
        [backend.address for backend in backends[3:]],
        backends[2].address,
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for backend in backends:
            backend.start()
            children.append(backend)
        print(f"starting: logs in {log_dir}/ ...", flush=True)
        for backend in backends:
            backend.wait_serving()
        # Started once every worker and shard serves, the gateway learns all models before it reports SERVING.
        gate.start()
        children.append(gate)
        gate.wait_serving()
        print(
            f"ready: gateway on 0.0.0.0:{gateway_port} (metrics :9150); on loopback only: text worker on :{text_port} "
            f"(metrics :9161), image worker on :{image_port} (metrics :9162), user-item worker on "
            f":{useritem_port} (metrics :9163; Fit files in {data_dir}/fit/), index shards on "
            f":{index_port} and :{index_port + 1} (data in {data_dir}/), redis on :{redis_port}. Ctrl-C stops all.",
            flush=True,
        )
        while not stopping and all(child.running() for child in children):
            time.sleep(0.5)
        for child in children:
            if not child.running():
                print(f"{child.name} exited; see {child.log_path}", file=sys.stderr)
    finally:
        for child in reversed(children):
            child.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
