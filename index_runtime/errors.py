"""Errors that know their HTTP status.

Every error the runtime raises on purpose derives from :class:`DriftlessError` and carries
``status`` (the HTTP status an API would answer with) and ``reason`` (a CamelCase word that
status conditions and API bodies reuse). One middleware maps them to responses.
"""

from __future__ import annotations


class DriftlessError(Exception):
    """Base class: ``status`` is an HTTP status code, ``reason`` a CamelCase word."""

    status = 500
    reason = "InternalError"
    retry_after_s: float | None = None  # set: the answer carries Retry-After (429, 503)

    def code(self) -> int:
        return self.status


class InvalidInputError(DriftlessError):
    """The request is malformed: wrong dimension, NaN/Inf, bad key type, conflicting rows."""

    status = 400
    reason = "InvalidInput"


class BatchTooLargeError(InvalidInputError):
    status = 413
    reason = "BatchTooLarge"


class NotFoundError(DriftlessError):
    status = 404
    reason = "NotFound"


class ObjectNotFoundError(NotFoundError):
    """An object the caller asked for is not in the object store."""

    reason = "ObjectNotFound"


class PayloadTooLargeError(DriftlessError):
    """A request body, or the answer it asks for, is over a configured limit (named in the
    message)."""

    status = 413
    reason = "PayloadTooLarge"


class FormatVersionError(DriftlessError):
    """A manifest or segment was written by a format this build does not understand: a
    condition of the server's data, not of the request."""

    status = 500
    reason = "UnknownFormatVersion"


class CorruptObjectError(DriftlessError):
    status = 500
    reason = "CorruptObject"


class StoreConfigError(DriftlessError):
    """The store cannot be used as configured (missing bucket, bad directory)."""

    status = 503
    reason = "StoreMisconfigured"


class CredentialsError(StoreConfigError):
    """The object store refused the credentials. The credentials themselves are never shown."""

    reason = "CredentialsRefused"


class StoreUnavailableError(DriftlessError):
    """A transient failure of the object store (network, 5xx, throttling). Retry later."""

    status = 503
    reason = "StoreUnavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackpressureError(DriftlessError):
    """The writer is over its memtable or WAL bounds; the client should retry after a while."""

    status = 429
    reason = "Backpressure"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InsufficientStorageError(DriftlessError):
    """The local disk (WAL, data directory) is full: the write was not applied. Reads go on;
    writes are accepted again once space returns."""

    status = 507
    reason = "InsufficientStorage"

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StorageFaultError(DriftlessError):
    """A local I/O error other than a full disk (EIO, ...): the write was not applied."""

    status = 503
    reason = "StorageFault"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FencedError(DriftlessError):
    """A newer writer epoch owns the index; this writer must stop. A server condition: the
    client retries (against the new writer, once it serves)."""

    status = 503
    reason = "WriterFenced"

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CommitConflictError(DriftlessError):
    """The manifest kept moving under us beyond the bounded number of rebase attempts."""

    status = 503
    reason = "CommitConflict"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RestoreError(DriftlessError):
    status = 409
    reason = "RestoreImpossible"


class ClosedError(DriftlessError):
    """The writer is shutting down or closed and accepts no more writes."""

    status = 503
    reason = "ShuttingDown"


class ConflictError(DriftlessError):
    """The request is valid but conflicts with the index's state (e.g. writes sent to a
    reader, promote without a candidate, an index that already exists)."""

    status = 409
    reason = "Conflict"


class MigrationNotActiveError(ConflictError):
    """A backfill call for a migration that is not the active one, or not in a phase that
    backfills (Bridged, Backfilling): the worker is done (nothing to retry)."""

    reason = "MigrationNotActive"


class UnauthorizedError(DriftlessError):
    """A call without a valid bearer token."""

    status = 401
    reason = "Unauthorized"


class ForbiddenError(DriftlessError):
    """A valid token whose scope does not cover the call (e.g. a read token on upsert)."""

    status = 403
    reason = "Forbidden"


class EncoderError(DriftlessError):
    """An encoder could not turn text into vectors (endpoint down, bad answer, wrong dimension).
    A dependency failure, not the caller's fault: 503 so clients retry or send vectors."""

    status = 503
    reason = "EncoderUnavailable"


# --- encoder faults (issue 15): transient vs permanent -----------------------------------------


class EncoderUnavailableError(EncoderError):
    """Transient: the encoder timed out, could not be reached, reset the connection, answered
    429 or 5xx, or its circuit breaker is open. Retrying later can succeed (``retry_after_s``:
    the encoder's Retry-After, or the breaker's remaining cool-down; None when the encoder
    gave no hint — the service's guard then answers with a Retry-After of its own)."""

    status = 503
    reason = "EncoderUnavailable"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EncoderRejectedError(EncoderError):
    """Permanent: the encoder refused the request (a 4xx other than 408/429: unknown model,
    bad credentials, input it will never accept), returned vectors of the wrong shape, or a
    bundled model failed to load. Retrying the same call cannot succeed: a migration pauses
    with reason ``EncoderFailed`` until someone fixes the encoder."""

    status = 424
    reason = "EncoderRejected"


class MigrationMismatchError(ConflictError):
    """A migration request names another migration than the index's current one (by id)."""

    reason = "MigrationMismatch"
