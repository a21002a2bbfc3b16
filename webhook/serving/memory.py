"""Memory freed after a burst goes back to the system.

glibc's malloc keeps what large requests freed: its mmap threshold rises to the largest block
freed (up to 32 MiB), so after one 8 MiB body every later one is carved from the heap, whose
free space is seldom returned; and each thread that allocates (the reviews' worker threads)
gets an arena of its own. Measured on a burst of two dozen 8 MiB bodies, 270-360 MiB stayed
behind. Fixing the threshold keeps every large block in its own mapping, unmapped when
freed; two arenas bound the per-thread ones.

The threshold is fixed at 512 KiB, not at glibc's starting 128 KiB: uvloop reads every TLS record
into a fresh 256 KiB bytes object (`SSL_READ_MAX_SIZE`), shrunk to what arrived. Under a
128 KiB threshold each read was an mmap, a page fault or two, an mremap and an munmap: a
third of the CPU time of a memoised review (183 -> 131 us per request, `make bench`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

log = logging.getLogger("outrigger.server")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Above uvloop's 256 KiB TLS reads (see above); bodies of megabytes still get mappings.
MMAP_THRESHOLD_BYTES = 512 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024
ARENAS = 2


def release_free_pages() -> bool:
    """glibc's `malloc_trim(0)`: every whole free page of its heaps back to the system, those
    between live blocks included (freeing only ever gives back the top of a heap). Called a
    second after a burst of large bodies, whose TLS reads (256 KiB each, under the threshold)
    are carved from the heap: two dozen 8 MiB bodies left 25-46 MiB resident behind a few
    live blocks, 14-15 MiB once trimmed. False where the C library has no malloc_trim."""
    trim = _glibc("malloc_trim", ctypes.c_size_t)
    if trim is None:
        return False
    trim(0)
    return True


def return_freed_memory() -> bool:
    """Set glibc's malloc as above; False (and a debug line) where the C library is not
    glibc (musl, say), whose allocator returns large blocks by itself."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        log.debug("no glibc mallopt in the C library: the allocator is left as it is")
        return False
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_ARENA_MAX, ARENAS),
    )
    return all(mallopt(option, value) == 1 for option, value in settings)


@functools.cache
def _glibc(function: str, *argument_types: Any) -> Any:
    """glibc's `function`, taking `argument_types`; None where the C library has none."""
    try:
        found = getattr(ctypes.CDLL(ctypes.util.find_library("c")), function)
    except (OSError, AttributeError, TypeError):
        return None
    found.argtypes = list(argument_types)
    return found
