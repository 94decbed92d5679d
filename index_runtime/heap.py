"""Giving the C heap's free pages back to the operating system after a large rebuild.

Building a view decodes every segment into temporaries (Arrow batches, key columns, masks)
that are freed once the view's own arrays are filled; glibc keeps most of that freed memory
in its arenas, so the process's RSS stays at the load's high-water mark. Measured on a
reader with memory-mapped vectors at 10M x 128 (bench/vectors_mmap.py's data): 2,015 MiB
anonymous after the load, 1,121 MiB after ``malloc_trim(0)``, against 1,040 MiB planned
(`driftless plan`). ``trim`` asks glibc to return it; elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache
from typing import Any

log = logging.getLogger(__name__)


@cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no libc by that name, or not glibc
        fn = None
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Return the heap's free pages to the OS (glibc); False where that is not possible."""
    fn = _malloc_trim()
    if fn is None:
        return False
    try:
        fn(0)
    except OSError as exc:  # pragma: no cover (a libc that refuses)
        log.debug("malloc_trim failed: %s", exc)
        return False
    return True
