"""How much memory the user-item worker needs at most, from its limits, so that USERITEM_MAX_INTERACTIONS,
USERITEM_MAX_IDS and the container's memory limit can be checked against each other (at start, and by
tests/test_deploy.py against the Kubernetes manifest).

The figures are peaks of resident memory measured on whole Fits (intake, numbering, training, writing,
promotion: bench/useritem_memory.py, 32 factors), with margin:

- the process with torch loaded and warmed up by a Fit: 757-763 MiB;
- per interaction: 74-81 bytes (1 to 7.3 M interactions), 85 with timestamps;
- per distinct id: 1.70 KB with 8-byte ids, 2.32 KB with 512-byte ones (400,000 ids), most of it the
  four float32 copies Adam keeps of each parameter vector (value, gradient, two moments) and the best
  epoch's snapshot; small runs measure more per id (2.2 and 3.2 KB at 100,000 ids: fixed overheads);
- a Fit at the default limits (20 M interactions, 500,000 ids of 512 bytes): 2.17 GiB over the warm
  process, against 2.82 GiB for the Fit part of this budget;
- one FitRequest of USERITEM_MAX_MESSAGE_BYTES: up to 4.4 times its size once parsed, besides the bytes;
- the version being replaced serves until the new one is promoted, so it counts too.

An EASE Fit keeps no per-id training state; instead it holds items x items float32 matrices
(USERITEM_EASE_MAX_ITEMS bounds the item count): the one being solved in place (which becomes the new
version's; it is written to disk from its own memory), the version being replaced, and, when a Fit
repeats a version already on disk, that saved copy, which the write's intact check loads; besides the
products of GRAM_BLOCK columns that build X'X and about 64 bytes per interaction of sparse copies of X
(csr, csc, its transpose, the validation history). Measured on MovieLens' 9,066 items (one matrix 329
MB): a first Fit peaked 485 MB over the process; a Fit of the same data again, 658 MB over a process
serving the first (987 MB with it), against 1,061 MB counted here.
"""

from pathlib import Path

from services.useritem.ease import GRAM_BLOCK
from services.useritem.settings import UserItemSettings

PROCESS_BYTES = 800 * 2**20
FIT_BYTES_PER_INTERACTION = 90
SERVING_BYTES_PER_INTERACTION = 8  # seen items (int32; int64 in versions saved before)
MESSAGE_COPIES = 6  # a message's bytes in gRPC, their copy for the parser, and the parsed message
EASE_MATRIX_COPIES = 3  # solved in place (the new version's), the version replaced, a saved copy checked
EASE_BYTES_PER_INTERACTION = 64


def fit_bytes_per_id(settings: UserItemSettings) -> int:
    """An MF Fit's memory per id: the id's intake and its vector's training state."""
    floats = 4 * (settings.factors + 1)  # a vector and its bias
    return 7 * floats + intake_bytes_per_id(settings)


def intake_bytes_per_id(settings: UserItemSettings) -> int:
    return 900 + settings.max_id_bytes * 5 // 4


def ease_fit_bytes(settings: UserItemSettings) -> int:
    """An EASE Fit's memory beyond the intake: its matrices and the sparse copies of the interactions."""
    items = settings.ease_max_items
    matrices = 4 * items * items * EASE_MATRIX_COPIES + 2 * 4 * GRAM_BLOCK * items
    return matrices + settings.max_interactions * EASE_BYTES_PER_INTERACTION


def serving_bytes_per_id(settings: UserItemSettings) -> int:
    floats = 4 * (settings.factors + 1)
    return 3 * floats + 250 + settings.max_id_bytes


def fit_peak_bytes(settings: UserItemSettings) -> int:
    """Resident memory of the worker at the peak of its largest Fit, retraining a model of that size
    (of either kind: an MF Fit's training state per id, or an EASE Fit's matrices)."""
    interactions, ids = settings.max_interactions, settings.max_ids
    mf = ids * (fit_bytes_per_id(settings) - intake_bytes_per_id(settings))
    return (
        PROCESS_BYTES
        + MESSAGE_COPIES * settings.max_message_bytes
        + interactions * (FIT_BYTES_PER_INTERACTION + SERVING_BYTES_PER_INTERACTION)
        + ids * (intake_bytes_per_id(settings) + serving_bytes_per_id(settings))
        + max(mf, ease_fit_bytes(settings))
    )


def container_memory_limit() -> int | None:
    """This container's memory limit (cgroup v2, else v1), or None where there is none."""
    for path in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:  # v1 says "no limit" with a huge number
            return int(value)
        return None
    return None
