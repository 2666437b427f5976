"""Freed arrays go back to the system.

glibc raises its mmap threshold each time a large block allocated by mmap is freed (up to 32 MiB); from
then on, arrays of that size come from the heap, and freed they stay in the process. A shard that
compacts a space (or grows its rows, or snapshots) would keep the peak of its arrays as RSS for good:
after 200,000 rewrites of one 384-d item, 235 MiB for one live item, against 78 MiB with the threshold
fixed at glibc's default (128 KiB), which makes every large array its own mapping, returned when freed.
"""

import ctypes

_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024


def return_freed_arrays() -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc (nothing to do there)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD))
