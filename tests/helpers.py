"""Small helpers shared by the tests."""

import re
import urllib.request

import numpy as np
from embeddings.v1 import types_pb2 as pb

from services.common.vectors import from_wire

# How late an awaited event may come, past the time the code under test allows for it, on this shared
# 2-core machine with a CPU hog beside the suite. An upper bound on a duration is that time plus LATE_S,
# and is asserted only where what it rules out (waiting for a timeout of many seconds, or forever) takes
# clearly longer.
LATE_S = 3.0


def texts(*values: str) -> list[pb.Input]:
    return [pb.Input(text=value) for value in values]


def images(*payloads: bytes) -> list[pb.Input]:
    return [pb.Input(image=payload) for payload in payloads]


def vectors(response) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([from_wire(embedding.vector) for embedding in response.embeddings])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of a Prometheus metric from a service's /metrics endpoint (0 if absent)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        match = re.match(rf"^{re.escape(name)}{{(.*)}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            return float(match.group(2))
    return 0.0
