"""Real processes on free loopback ports: a throwaway redis-server, and any of the services."""

import fcntl
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


# Ports handed out by free_port, each with its lock file's descriptor, held while this process lives.
_RESERVED: dict[int, int] = {}
_LOCKS = Path(tempfile.gettempdir()) / "embeddings-test-ports"
_LOWEST_PORT = 20000
# Not the `random` module's generator: test plugins reseed it per test, and suites side by side alike.
_PICK = random.SystemRandom()


def _ephemeral_start() -> int:
    """The first port the kernel hands to outgoing connections (and to bind(0))."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port for a process to bind, that nothing else takes before it does.

    A port found by binding port 0 is free only until it is released: an outgoing connection (whose local
    port comes from the same ephemeral range) or a suite running beside this one could take it before the
    process binds it. So it is picked below that range, reserved by a lock file that every suite on this
    machine respects (held for as long as this process lives, so later restarts on it stay ours), and
    checked free by binding it. Services bind without SO_REUSEPORT, so a clash that remains fails loudly.
    """
    _LOCKS.mkdir(exist_ok=True)
    high = _ephemeral_start()
    for _ in range(10_000):
        port = _PICK.randrange(_LOWEST_PORT, high)
        if port in _RESERVED:
            continue
        descriptor = os.open(_LOCKS / str(port), os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                os.close(descriptor)
                continue
        _RESERVED[port] = descriptor
        return port
    raise RuntimeError(f"no free port between {_LOWEST_PORT} and {high} that no other suite holds")


def new_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="embeddings-logs-"))


def redis_answers(port: int, tls: bool = False) -> bool:
    """A Redis server answers PING on 127.0.0.1:`port` (NOAUTH counts: it answered); with `tls`, that it
    accepts connections there (the handshake is the client's business)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if tls:
                return True
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A plaintext channel, or a TLS one with `credentials`."""
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def health_status(
    address: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """SERVING / NOT_SERVING / ... of the whole server, or UNREACHABLE."""
    with open_channel(address, credentials) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@dataclass
class Process:
    """One child process with its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = field(default_factory=new_log_dir)
    popen: subprocess.Popen[bytes] | None = None
    cwd: Path = ROOT  # another checkout runs its own code (benchmarks comparing two versions)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        """Block until the process answers (nothing to wait for by default)."""

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux /proc)."""
        assert self.popen is not None
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if not self.running():
            return
        self.signal(signal.SIGTERM)
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.running():
            self.signal(signal.SIGKILL)
            self.wait(10)


@dataclass(frozen=True)
class RedisTls:
    """PEM files for a Redis server that speaks TLS only; `auth_clients`: it requires client certificates."""

    cert: Path
    key: Path
    ca: Path
    auth_clients: bool = False

    def args(self, port: int) -> list[str]:
        return [
            *("--port", "0", "--tls-port", str(port)),
            *("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)),
            *("--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes" if self.auth_clients else "no"),
        ]


class RedisServer(Process):
    """A real redis-server on a free port, no persistence: the tests' and benchmarks' cache. Optionally
    with a password (`requirepass`) or TLS."""

    def __init__(
        self,
        port: int | None = None,
        log_dir: Path | None = None,
        password: str = "",
        tls: RedisTls | None = None,
    ) -> None:
        self.port = port or free_port()
        self.tls = tls
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make setup`")
        argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += tls.args(self.port) if tls else ["--port", str(self.port)]
        argv += ["--requirepass", password] if password else []
        super().__init__("redis", argv, log_dir=log_dir or new_log_dir())

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if redis_answers(self.port, tls=self.tls is not None):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")


class RedisCluster:
    """A real Redis Cluster on free ports: `size` redis-servers in cluster mode, no replicas, no
    persistence, the 16384 slots split evenly between them (formed with redis-py: no redis-cli needed).
    `nodes[i]` is each server, to kill or freeze one; `url` names the first, the seed a client starts from.
    Optionally with a password (`requirepass` on every node). A context manager: started on entry, stopped
    on exit."""

    SLOTS = 16384

    def __init__(self, size: int = 3, log_dir: Path | None = None, password: str = "") -> None:
        log_dir = log_dir or new_log_dir()
        self.password = password
        self.data_dir = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.nodes = [RedisServer(log_dir=log_dir, password=password) for _ in range(size)]
        # each a free bus port of its own: the default, port + 10000, may be taken or past 65535
        self.bus_ports = [free_port() for _ in self.nodes]
        for node, bus_port in zip(self.nodes, self.bus_ports, strict=True):
            node.name = f"redis-cluster-{node.port}"
            node_dir = self.data_dir / str(node.port)
            node_dir.mkdir()
            node.argv += [
                *("--cluster-enabled", "yes", "--dir", str(node_dir)),
                *("--cluster-config-file", str(self.data_dir / f"nodes-{node.port}.conf")),
                *("--cluster-port", str(bus_port)),
            ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 20.0) -> None:
        for node in self.nodes:
            node.start()
        clients = [
            redis.Redis(host="127.0.0.1", port=node.port, password=self.password or None)
            for node in self.nodes
        ]
        try:
            share = self.SLOTS // len(clients)
            for i, client in enumerate(clients):
                last = self.SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)
            for client in clients[1:]:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port, self.bus_ports[0])
            deadline = time.monotonic() + timeout
            while not all(self._formed(client.execute_command("CLUSTER INFO")) for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Redis Cluster did not form within {timeout:.0f}s")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def _formed(self, info: dict[str, str]) -> bool:
        """CLUSTER INFO (as redis-py parses it) says the cluster is up and the node knows every other."""
        return info["cluster_state"] == "ok" and info["cluster_known_nodes"] == str(len(self.nodes))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "RedisCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Service(Process):
    """`python -m services.<module>` on a free gRPC port (metrics on another). A service whose port speaks
    TLS needs `credentials` (a client's) for the harness's health checks."""

    credentials: grpc.ChannelCredentials | None = None

    def __init__(
        self,
        module: str,
        env_prefix: str,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.metrics_port = free_port()
        settings = {
            f"{env_prefix}PORT": str(self.port),
            f"{env_prefix}HOST": "127.0.0.1",
            f"{env_prefix}METRICS_PORT": str(self.metrics_port),
            **(env or {}),
        }
        super().__init__(
            module,
            [sys.executable, "-m", f"services.{module}"],
            settings,
            log_dir=log_dir or new_log_dir(),
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        self.wait_serving()

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited while starting:\n{self.log_tail()}")
            if health_status(self.address, credentials=self.credentials) == "SERVING":
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not SERVING within {timeout:.0f}s:\n{self.log_tail()}")


class MilvusLite(Process):
    """Milvus Lite's server (the milvus-lite package's C++ engine, the same one its embedded mode runs) on a
    free loopback TCP port, keeping its data in `data_dir`: a Milvus to point a gateway at with
    GATEWAY_MILVUS_URI=`uri`. The same `data_dir` after a restart: the same data."""

    def __init__(self, data_dir: Path, log_dir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        # found without importing milvus_lite, whose __init__ needs setuptools' removed pkg_resources
        spec = importlib.util.find_spec("milvus_lite")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("milvus-lite is not installed: run `make setup`")
        lib = Path(spec.submodule_search_locations[0]) / "lib"
        argv = [str(lib / "milvus"), str(data_dir / "milvus.db"), f"127.0.0.1:{self.port}", "ERROR"]
        library_path = ":".join(filter(None, [str(lib), os.environ.get("LD_LIBRARY_PATH", "")]))
        super().__init__("milvus", argv, {"LD_LIBRARY_PATH": library_path}, log_dir=log_dir or new_log_dir())

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until its gRPC port accepts a channel."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"milvus exited while starting:\n{self.log_tail()}")
            with grpc.insecure_channel(self.address) as channel:
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    pass
        raise RuntimeError(f"milvus did not listen within {timeout:.0f}s:\n{self.log_tail()}")


P = TypeVar("P", bound=Process)


@contextmanager
def running(process: P) -> Iterator[P]:
    """Start `process` and wait until it answers; stop it (SIGTERM, then SIGKILL) on the way out."""
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def text_worker(
    env: dict[str, str] | None = None, log_dir: Path | None = None, port: int | None = None
) -> Service:
    return Service("text", "TEXT_", env, log_dir, port)


def image_worker(
    env: dict[str, str] | None = None, log_dir: Path | None = None, port: int | None = None
) -> Service:
    return Service("image", "IMAGE_", env, log_dir, port)


def index_shard(
    data_dir: Path,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    port: int | None = None,
    name: str = "index",
) -> Service:
    """An index shard keeping its data in `data_dir` (the same dir after a restart: the same shard)."""
    shard = Service("index", "INDEX_", {"INDEX_DATA_DIR": str(data_dir), **(env or {})}, log_dir, port)
    shard.name = name
    return shard


def useritem_worker(
    data_dir: Path,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    port: int | None = None,
    fit_dir: Path | None = None,
) -> Service:
    """A user-item worker keeping its models in `data_dir`; Fit reads files from `fit_dir` (default: none)."""
    settings = {
        "USERITEM_DATA_DIR": str(data_dir),
        "USERITEM_FIT_DIR": str(fit_dir) if fit_dir else "",
        **(env or {}),
    }
    return Service("useritem", "USERITEM_", settings, log_dir, port)


def gateway(
    workers: list[str],
    redis_url: str,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    port: int | None = None,
    shards: list[str] | None = None,
    useritem: str = "",
) -> Service:
    settings = {
        "GATEWAY_WORKERS": ",".join(workers),
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_INDEX_SHARDS": ",".join(shards or []),
        "GATEWAY_USERITEM": useritem,
        **(env or {}),
    }
    return Service("gateway", "GATEWAY_", settings, log_dir, port)
