"""Index shard addresses from DNS: the SRV records of a Kubernetes headless Service in front of a StatefulSet.

Kubernetes publishes, for a headless Service `index` with a port named `grpc`, one SRV record per pod at
`_grpc._tcp.index.<namespace>.svc.cluster.local`, whose target is the pod's stable name
(`index-3.index.<namespace>.svc.cluster.local.`) and whose port is the Service port. The pod's ordinal (the
`-3` ending the target's first label) is its shard number; the number of shards is fixed by configuration
(GATEWAY_INDEX_SHARD_COUNT), not by what DNS lists at a given moment, since ids are hashed over it.
"""

import ipaddress
import logging
import re
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver

log = logging.getLogger("discovery")

_ORDINAL = re.compile(r"^(?P<prefix>.*)-(?P<ordinal>\d+)$")


class DiscoveryError(Exception):
    """DNS did not answer (timeout, SERVFAIL, unreachable nameserver): what was known before still holds."""


def parse_nameserver(value: str) -> tuple[str, int]:
    """`ip`, `ip:port` or `[ipv6]:port` -> (ip, port); port 53 when none is given."""
    host, port = value.strip(), "53"
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{value!r} is not ip:port")
            port = rest[1:]
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: the DNS server must be an IP address (ip:port)") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: the port must be a number in 1..65535")
    return host, int(port)


def ordinal(target: str) -> int | None:
    """The ordinal of a StatefulSet pod from its DNS name (`index-3.index.ns.svc.cluster.local.` -> 3); None
    for a name with none, or for the dashed-IP names Kubernetes gives pods that are not in a StatefulSet
    (`10-1-2-7.index...`: the 7 there is no ordinal)."""
    label = target.split(".", 1)[0]
    match = _ORDINAL.match(label)
    if match is None or _dashed_ip(label):
        return None
    return int(match["ordinal"])


def _dashed_ip(label: str) -> bool:
    for text in (label.replace("-", "."), label.replace("-", ":")):
        try:
            ipaddress.ip_address(text)
            return True
        except ValueError:
            pass
    return False


@dataclass
class SrvDiscovery:
    """Resolves `name` (an SRV name) to shard number -> `host:port`, for shards 0 .. count-1."""

    name: str
    count: int
    nameserver: str = ""  # ip:port of a DNS server to ask instead of the system's resolvers
    timeout_s: float = 2.0
    _prefix: str = ""  # the pods' name less its ordinal, as last seen ("index")
    _warned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.count <= 0:
            raise ValueError("SRV discovery needs a shard count > 0")
        self._server = parse_nameserver(self.nameserver) if self.nameserver else None
        # Before any record is seen: the Service's name (`_grpc._tcp.<index>.ns...`), usually the pods' too.
        labels = [label for label in self.name.split(".") if label and not label.startswith("_")]
        self._prefix = labels[0] if labels else "shard"

    def pod(self, number: int) -> str:
        """The name of the pod expected to hold shard `number` (for messages)."""
        return f"{self._prefix}-{number}"

    def undiscovered(self, number: int) -> str:
        """How a shard that DNS has not listed yet is named in `missing_shards` and errors."""
        return f"shard {number} (not discovered yet: {self.pod(number)} is not in {self.name.rstrip('.')})"

    def _resolver(self) -> dns.asyncresolver.Resolver:
        try:
            resolver = dns.asyncresolver.Resolver(configure=self._server is None)
        except dns.exception.DNSException as error:  # no /etc/resolv.conf, or one with no nameserver
            raise DiscoveryError(f"no DNS resolver configured: {error}") from None
        if self._server is not None:
            resolver.port = self._server[1]
            resolver.nameservers = [self._server[0]]
        resolver.lifetime = self.timeout_s
        resolver.timeout = self.timeout_s
        return resolver

    async def resolve(self) -> dict[int, str]:
        """Shard number -> address of each shard the SRV records list now. An answer that lists nothing
        (no such name, no records: no pod yet) is an empty dict; a DNS failure raises DiscoveryError."""
        try:
            answer = await self._resolver().resolve(self.name, "SRV", raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return {}
        except dns.exception.DNSException as error:
            raise DiscoveryError(f"{type(error).__name__}: {error}") from None
        if answer.rrset is None:
            return {}
        candidates: dict[int, list[tuple[int, str]]] = {}
        for record in answer.rrset:
            target = record.target.to_text(omit_final_dot=True)
            number = ordinal(target)
            if number is None or number >= self.count:
                why = (
                    "has no ordinal (a StatefulSet pod's name ending in -<n>, not a dashed IP)"
                    if number is None
                    else f"is past GATEWAY_INDEX_SHARD_COUNT={self.count} (shards 0..{self.count - 1})"
                )
                self._warn(f"{self.name}: ignoring target {target}:{record.port}: its first label {why}")
                continue
            candidates.setdefault(number, []).append((record.priority, f"{target}:{record.port}"))
            self._prefix = target.split(".", 1)[0].rsplit("-", 1)[0]
        found: dict[int, str] = {}
        for number, listed in sorted(candidates.items()):
            listed.sort()  # lowest priority value first, then by name: the same choice every time
            found[number] = listed[0][1]
            if len({address for _, address in listed}) > 1:
                self._warn(
                    f"{self.name}: shard {number} is listed at {', '.join(a for _, a in listed)}; "
                    f"using {found[number]}"
                )
        return found

    def _warn(self, message: str) -> None:
        """Log each distinct warning once (discovery runs every few seconds)."""
        if message not in self._warned:
            if len(self._warned) > 1000:  # targets that keep changing: forget, rather than grow for ever
                self._warned.clear()
            self._warned.add(message)
            log.warning("%s", message)
