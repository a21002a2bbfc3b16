"""glibc's malloc as `outrigger serve` sets it (`webhook.serving.memory`), observed through
glibc's own accounting (`mallinfo2`: `hblks` counts the blocks that live in mappings of their
own), in a fresh interpreter, since the settings hold for the whole process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import uvloop

from webhook.serving.memory import MMAP_THRESHOLD_BYTES

# Run in a child: mallopt's settings cannot be undone for the rest of the test session.
_PROBE = r"""
import ctypes, json
from webhook.serving.memory import return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
set_ = return_freed_memory()
mapped = lambda: libc.mallinfo2().hblks
before = mapped()
tls_read = bytearray(256 * 1024)  # what uvloop allocates for every TLS read
with_tls_read = mapped()
body = bytearray(8 * 1024 * 1024)  # a hostile body of megabytes
with_body = mapped()
del body
after_body = mapped()
print(json.dumps({"set": set_, "before": before, "tls_read": with_tls_read,
                  "body": with_body, "after": after_body}))
"""


def _uvloop_tls_read_bytes() -> int:
    """uvloop's SSL_READ_MAX_SIZE, from the constants it ships with its sources."""
    consts = Path(uvloop.__file__).parent / "includes" / "consts.pxi"
    found = re.search(r"SSL_READ_MAX_SIZE = (\d+) \* (\d+)", consts.read_text())
    assert found, f"no SSL_READ_MAX_SIZE in {consts}"
    return int(found[1]) * int(found[2])


def test_uvloop_tls_reads_fit_under_the_mmap_threshold() -> None:
    assert _uvloop_tls_read_bytes() < MMAP_THRESHOLD_BYTES


def test_tls_reads_come_from_the_heap_and_large_bodies_get_mappings() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    counts = json.loads(probe.stdout)
    assert counts["set"] is True
    assert counts["tls_read"] == counts["before"], "a 256 KiB read got a mapping of its own"
    assert counts["body"] == counts["before"] + 1, "an 8 MiB body was carved from the heap"
    assert counts["after"] == counts["before"], "the 8 MiB body's mapping was kept"


# Blocks of a TLS read's size freed between live ones, as a burst of large bodies leaves them.
_FRAGMENTED = r"""
import json
from webhook.serving.memory import release_free_pages, return_freed_memory

def resident_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

return_freed_memory()
reads, kept = [], []
for _ in range(200):  # 50 MiB of reads, each followed by a small block that stays
    reads.append(bytes(256 * 1024))
    kept.append(bytes(1024))
del reads
freed = resident_kib()
released = release_free_pages()
print(json.dumps({"released": released, "freed": freed, "trimmed": resident_kib()}))
"""


def test_the_free_pages_between_live_blocks_go_back_to_the_system() -> None:
    """Freeing gives back only a heap's top; `release_free_pages` (malloc_trim) gives back
    the free pages between live blocks too."""
    probe = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED], capture_output=True, text=True, check=True, timeout=60
    )
    sizes = json.loads(probe.stdout)
    assert sizes["released"] is True
    assert sizes["freed"] - sizes["trimmed"] > 16 * 1024, sizes  # 25 MiB here; 0 untrimmed
