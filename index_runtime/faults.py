"""Named storage fault points, and how a local I/O error is reported to clients.

``DRIFTLESS_FAULT_AT=<point>:<errno>:<n>[:<count>]`` (several separated by ``,``) makes the
n-th hit of ``fault_point(<point>)`` raise ``OSError(<errno>)``, and the ``count - 1`` hits
after it too (default count 1; ``count`` 0 means every hit from the n-th on). ``<errno>`` is
a name (``ENOSPC``, ``EIO``, ``EDQUOT``) or a number. Tests arm faults in-process with
:func:`arm` / :func:`clear`. Without any fault armed a fault point costs one dict lookup.

The point names say where the bytes were going, in the order a write meets them.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
from dataclasses import dataclass

from index_runtime.errors import DriftlessError, InsufficientStorageError, StorageFaultError

ENV = "DRIFTLESS_FAULT_AT"

POINTS = (
    "wal.write",  # os.write of a WAL record
    "wal.fsync",  # fsync of the WAL after the record
    "wal.truncate",  # cutting a failed record off again (ftruncate + fsync)
    "wal.rotate",  # creating the next WAL file
    "segment.put",  # a segment object written to the local store
    "manifest.put",  # a manifest (or its hint) written to the local store
    "index.put",  # any other object (index files, codebooks, adapters, pins)
)

#: errnos meaning "no space": the write was refused for lack of room (507), not broken (503)
NO_SPACE = frozenset({errno_mod.ENOSPC, errno_mod.EDQUOT, errno_mod.EFBIG})


@dataclass
class _Fault:
    errno: int
    n: int  # the first hit that fails (1-based)
    count: int  # how many hits fail from there (0: all)
    hits: int = 0
    raised: int = 0


_lock = threading.Lock()
_armed: dict[str, _Fault] = {}
_env_loaded: str | None = None


def parse_errno(text: str) -> int:
    """``ENOSPC`` or ``28`` -> 28."""
    if text.isdigit():
        return int(text)
    value = getattr(errno_mod, text.upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"{ENV}: unknown errno {text!r}")
    return value


def parse_spec(spec: str) -> dict[str, _Fault]:
    """Parse ``DRIFTLESS_FAULT_AT``; raises ValueError naming what is wrong."""
    out: dict[str, _Fault] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in POINTS:
            raise ValueError(
                f"{ENV}={item!r}: expected <point>:<errno>:<n>[:<count>] with point one of "
                f"{', '.join(POINTS)}"
            )
        count = int(parts[3]) if len(parts) == 4 else 1
        out[parts[0]] = _Fault(parse_errno(parts[1]), int(parts[2]), count)
    return out


def arm(point: str, err: int | str, n: int = 1, count: int = 1) -> None:
    """Make hit ``n`` (and ``count - 1`` more; 0: all) of ``point`` raise ``OSError(err)``."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    code = parse_errno(err) if isinstance(err, str) else err
    with _lock:
        _armed[point] = _Fault(code, n, count)


def clear(point: str | None = None) -> None:
    """Disarm one point, or all."""
    with _lock:
        if point is None:
            _armed.clear()
        else:
            _armed.pop(point, None)


def injected() -> int:
    """How many faults the armed points raised so far (for campaign tables)."""
    with _lock:
        return sum(f.raised for f in _armed.values())


def _load_env() -> None:
    global _env_loaded
    spec = os.environ.get(ENV, "")
    if spec != _env_loaded:
        _env_loaded = spec
        _armed.update(parse_spec(spec))


def should_fail(fault: _Fault) -> bool:
    """Count one hit; True if this hit is in the failing range (pure apart from the count)."""
    fault.hits += 1
    if fault.hits < fault.n:
        return False
    return fault.count == 0 or fault.hits < fault.n + fault.count


def fault_point(name: str) -> None:
    """Raise the ``OSError`` armed for ``name`` if this hit is one that fails."""
    if not _armed and not os.environ.get(ENV):
        return
    with _lock:
        _load_env()
        fault = _armed.get(name)
        fail = fault is not None and should_fail(fault)
        if fail:
            assert fault is not None
            fault.raised += 1
    if fail:
        assert fault is not None
        raise OSError(fault.errno, f"{os.strerror(fault.errno)} (injected at {name})")


def object_point(key: str) -> str:
    """The fault point of a local-store put of ``key``."""
    if key.startswith("segments/"):
        return "segment.put"
    if key.startswith("manifests/"):
        return "manifest.put"
    return "index.put"


def storage_error(exc: OSError, what: str) -> DriftlessError:
    """What a client is told about a local I/O error: 507 when the disk is full, else 503.

    Both mean "not applied"; callers raise it only when that is true.
    """
    name = errno_mod.errorcode.get(exc.errno or 0, str(exc.errno))
    if exc.errno in NO_SPACE:
        return InsufficientStorageError(f"{what}: the disk is full ({name}); not applied")
    return StorageFaultError(f"{what}: local I/O error ({name}: {exc.strerror}); not applied")


def error_kind(exc: BaseException) -> str:
    """A metric label for a storage error: ``no_space``, ``io`` or the error's reason."""
    if isinstance(exc, InsufficientStorageError):
        return "no_space"
    if isinstance(exc, StorageFaultError):
        return "io"
    if isinstance(exc, OSError):
        return "no_space" if exc.errno in NO_SPACE else "io"
    if isinstance(exc, DriftlessError):
        return exc.reason
    return type(exc).__name__
