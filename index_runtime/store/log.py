"""Reading and committing manifest versions on an object store (the commit protocol).

A commit creates ``manifests/<version+1>`` with a conditional put. The loser of a race
reloads the newest manifest, re-applies its edit on top (rebase) and tries again, a bounded
number of times. A commit whose writer epoch is older than the newest manifest's is refused
with :class:`FencedError`: a zombie writer can never interleave with its successor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from index_runtime.errors import (
    CommitConflictError,
    CorruptObjectError,
    FencedError,
    NotFoundError,
    ObjectNotFoundError,
)
from index_runtime.store.manifest import (
    LATEST_HINT,
    MANIFEST_DIR,
    MANIFEST_FORMAT_VERSION,
    PIN_DIR,
    Manifest,
    Pin,
    StoredPin,
    decode_manifest,
    encode_manifest,
    manifest_key,
    parse_manifest_key,
    pin_key,
)
from index_runtime.store.objects import ObjectStore

log = logging.getLogger(__name__)

Edit = Callable[[Manifest], Manifest]


class ManifestLog:
    def __init__(self, store: ObjectStore, max_attempts: int = 8) -> None:
        self.store = store
        self.max_attempts = max_attempts

    def load(self, version: int) -> Manifest:
        try:
            return decode_manifest(self.store.get(manifest_key(version)))
        except ObjectNotFoundError:
            raise NotFoundError(
                f"manifest version {version} does not exist in {self.store.describe()}"
            ) from None

    def versions(self) -> list[int]:
        out = [parse_manifest_key(o.key) for o in self.store.list(MANIFEST_DIR)]
        return sorted(v for v in out if v is not None)

    def latest_version(self, listing: bool = False) -> int | None:
        """The newest version: from the hint, probing forward; a listing when the hint is stale
        or with ``listing``. The probe trusts that no version above the hint is missing below
        the newest: a hint left behind (its update failed, or a crash lost it) at a pinned
        version whose successors GC deleted would stop at that gap. Taking the writer epoch
        lists, so a writer never commits on top of a stale manifest there."""
        start: int | None = None
        try:
            start = None if listing else int(self.store.get(LATEST_HINT).decode())
        except (ObjectNotFoundError, ValueError):
            start = None
        if start is not None and self.store.exists(manifest_key(start)):
            v = start
            while self.store.exists(manifest_key(v + 1)):
                v += 1
            return v
        versions = self.versions()
        return versions[-1] if versions else None

    def latest(self, listing: bool = False) -> Manifest | None:
        v = self.latest_version(listing)
        if v is None:
            return None
        try:
            return self.load(v)
        except NotFoundError:
            # deleted by manifest GC between the probe and the read: look again
            v = self.latest_version(listing)
            return None if v is None else self.load(v)

    def create(self, m: Manifest) -> bool:
        """Write version ``m.version`` if nobody has; also refresh the (advisory) hint."""
        if not self.store.put_if_absent(manifest_key(m.version), encode_manifest(m)):
            return False
        try:
            # not fsynced once it exists: a stale, empty or lost hint after a crash only costs
            # a probe or a listing (latest_version); the manifest above is the commit
            self.store.put_advisory(LATEST_HINT, str(m.version).encode())
        except Exception as exc:  # the hint is advisory: a stale one only costs a listing
            log.warning("could not update the manifest hint: %s", exc)
        return True

    def commit(self, base: Manifest, edit: Edit, epoch: int, reason: str) -> Manifest:
        """Apply ``edit`` on top of the newest manifest and commit it as the next version.

        ``base`` is the caller's view; if the store has moved on, the edit is re-applied to
        the newer manifest (rebase). Raises :class:`FencedError` as soon as a newer epoch is
        seen, and :class:`CommitConflictError` after ``max_attempts`` lost races.
        """
        current = base
        for _attempt in range(self.max_attempts):
            if current.writer_epoch != epoch:
                raise FencedError(
                    f"writer epoch {epoch} was superseded by epoch {current.writer_epoch}"
                )
            proposed = replace(
                edit(current),
                version=current.version + 1,
                format_version=MANIFEST_FORMAT_VERSION,  # written in this build's format
                writer_epoch=epoch,
                committed_at=time.time(),
                reason=reason,
            )
            if self.create(proposed):
                return proposed
            newer = self.latest()
            if newer is None:
                raise CorruptObjectError("manifest disappeared during a commit")
            if newer.version == proposed.version and replace(newer, committed_at=0.0) == replace(
                proposed, committed_at=0.0
            ):
                return newer  # our own write: a retried request saw the 412 its first try caused
            current = newer
        raise CommitConflictError(
            f"gave up committing {reason!r} after {self.max_attempts} lost races"
        )

    def bump_epoch(self) -> Manifest:
        """Take ownership: commit the next version with an epoch above every earlier one.

        On a lost race the epoch is recomputed from the winner, so two writers opening at
        once never share an epoch.
        """
        for _attempt in range(self.max_attempts):
            current = self.latest(listing=True)  # authoritative: see latest_version
            if current is None:
                raise NotFoundError(f"no index exists in {self.store.describe()}")
            proposed = replace(
                current,
                version=current.version + 1,
                writer_epoch=current.writer_epoch + 1,
                committed_at=time.time(),
                reason="writer-open",
            )
            if self.create(proposed):
                return proposed
        raise CommitConflictError(
            f"could not take the writer epoch after {self.max_attempts} attempts"
        )

    # pins -----------------------------------------------------------------------------------

    def put_pin(self, pin: Pin) -> None:
        self.store.put(pin_key(pin.holder), pin.encode())

    def drop_pin(self, holder: str) -> None:
        self.store.delete(pin_key(holder))

    def read_pins(self) -> dict[str, StoredPin]:
        """Every pin object (expired or not) by object key; unreadable ones with ``pin=None``."""
        out: dict[str, StoredPin] = {}
        for obj in self.store.list(PIN_DIR):
            try:
                data = self.store.get(obj.key)
            except ObjectNotFoundError:
                continue  # dropped meanwhile
            try:
                pin: Pin | None = Pin.decode(data)
            except CorruptObjectError:
                pin = None
            out[obj.key] = StoredPin(pin, obj.mtime, data)
        return out

    def live_pins(self, now: float) -> list[Pin]:
        return [
            p.pin for p in self.read_pins().values() if p.pin is not None and p.pin.expires_at > now
        ]

    def delete_pin_if_unchanged(self, key: str, seen: bytes) -> bool:
        """Delete the pin object ``key`` if it still holds ``seen``: a holder that renewed its
        lease since it was read keeps its pin. (The store has no conditional delete; the
        window between this read and the delete is one round trip, and a holder renews a
        third of a lease before expiry, never an expired-plus-grace one.)"""
        try:
            if self.store.get(key) != seen:
                return False
        except ObjectNotFoundError:
            return False
        self.store.delete(key)
        return True
