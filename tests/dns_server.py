"""A tiny real DNS server for tests: UDP on 127.0.0.1 (a free port), in a thread of its own, answering SRV
queries from a dict the test changes while it runs (dnspython builds and parses the messages)."""

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


@dataclass(frozen=True)
class Srv:
    """One SRV record: `target` (a DNS name, final dot included) and `port`."""

    target: str
    port: int
    priority: int = 0
    weight: int = 0


@dataclass
class DnsServer:
    """`records`: SRV name -> its records (a name not in it: NXDOMAIN; an empty list: no records). `mode`:
    "answer", "servfail" (answers SERVFAIL), or "silent" (reads queries and never answers: a DNS down)."""

    records: dict[str, list[Srv]] = field(default_factory=dict)
    mode: str = "answer"
    queries: int = 0
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    def set(self, name: str, records: list[Srv] | None) -> None:
        """Replace the records of `name` (None: the name no longer exists)."""
        with self._lock:
            if records is None:
                self.records.pop(name, None)
            else:
                self.records[name] = list(records)

    def start(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                wire, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(wire)
            except Exception:  # not a DNS message: ignored, as a server would
                continue
            self.queries += 1
            response = self._answer(query)
            if response is not None:
                self._sock.sendto(response.to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        with self._lock:
            mode, records = self.mode, {dns.name.from_text(k): list(v) for k, v in self.records.items()}
        if mode == "silent":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        question = query.question[0]
        if question.name not in records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        if question.rdtype == dns.rdatatype.SRV and records[question.name]:
            response.answer.append(
                dns.rrset.from_text_list(
                    question.name,
                    5,
                    dns.rdataclass.IN,
                    dns.rdatatype.SRV,
                    [f"{r.priority} {r.weight} {r.port} {r.target}" for r in records[question.name]],
                )
            )
        return response


@contextmanager
def dns_server(records: dict[str, list[Srv]] | None = None) -> Iterator[DnsServer]:
    server = DnsServer(dict(records or {}))
    server.start()
    try:
        yield server
    finally:
        server.stop()
