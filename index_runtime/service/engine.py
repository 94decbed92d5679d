"""The set of indexes one process serves, over a local directory or an S3 prefix."""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index_runtime.encoders import Kind
from index_runtime.encoders.breaker import Breaker
from index_runtime.encoders.resilience import BACKGROUND, REQUEST, Guard, RetryPolicy
from index_runtime.errors import ConflictError, InvalidInputError, NotFoundError
from index_runtime.index.settings import IndexSettings
from index_runtime.service.auth import TokenSet
from index_runtime.service.limits import ApiLimits
from index_runtime.service.runtime import Hooks, IndexRuntime, Roles, RuntimeOptions
from index_runtime.service.tokens import TokenSource
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import LATEST_HINT, IndexSpec, ModelSpec
from index_runtime.store.objects import LocalDirStore, ObjectStore, S3Config, S3Store
from index_runtime.store.writer import IndexWriter, WriterConfig

log = logging.getLogger(__name__)

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # always fullmatch: '$' also matches before '\n'
Encoder = Callable[[list[str], Kind], np.ndarray]  # (texts, 'query' | 'passage') -> rows


@dataclass(frozen=True)
class ServeConfig:
    data: Path | None = None  # local directory (one subdirectory per index)
    s3: S3Config | None = None  # or an S3 bucket/prefix (one sub-prefix per index)
    wal_dir: Path | None = None  # where writers keep their WAL (default: <data>/.wal)
    roles: Roles = field(default_factory=Roles)
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    writer: WriterConfig = field(default_factory=WriterConfig)
    tokens: TokenSet = field(default_factory=TokenSet)  # plain tokens (env, tests)
    # '<scope> sha256:<hex>' lines (a mounted Secret), re-read when the file changes
    tokens_file: Path | None = None
    limits: ApiLimits = field(default_factory=ApiLimits)
    # serve this index only (a pod of one VectorIndex: Env.INDEX). Other indexes under the
    # same location are never opened: opening one as a writer bumps its epoch and would
    # fence that index's own writer, and readers would load every index into memory.
    only: str | None = None
    # each model's encoder calls: consecutive transient failures that open its breaker, and
    # the cool-down before a probe (see encoders/breaker.py)
    encoder_breaker: Breaker = field(default_factory=Breaker)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.s3 is None):
            raise InvalidInputError("give exactly one of a data directory or an S3 location")
        if self.only is not None:
            check_name(self.only)
        if self.roles.writer and self.data is None and self.wal_dir is None:
            raise InvalidInputError("a writer on S3 needs --wal-dir (a local, durable directory)")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidInputError(
            f"index names are 1..63 lowercase letters, digits and '-', starting with a letter "
            f"or digit; got {name!r}"
        )
    return name


class Engine:
    def __init__(
        self,
        config: ServeConfig,
        hooks: Hooks | None = None,
        encoders: dict[str, Encoder] | None = None,
    ) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self.encoders = encoders or {}
        self._guards: dict[str, Guard] = {}
        self._guards_lock = threading.Lock()
        self.runtimes: dict[str, IndexRuntime] = {}
        self._lock = threading.Lock()
        self.closing = False
        self.token_source = TokenSource(config.tokens, config.tokens_file)

    @property
    def tokens_problem(self) -> str | None:
        """Why the tokens file is not (fully) applied (None: it is)."""
        return self.token_source.problem

    def tokens(self) -> TokenSet:
        """The accepted tokens (:meth:`TokenSource.tokens`: the config's plus the tokens
        file's, re-read when it changes; fails closed)."""
        return self.token_source.tokens()

    def _store(self, name: str) -> ObjectStore:
        if self.config.data is not None:
            return LocalDirStore(self.config.data / name)
        assert self.config.s3 is not None
        base = self.config.s3.prefix.strip("/")
        prefix = f"{base}/{name}" if base else name
        return S3Store(S3Config(**{**self.config.s3.__dict__, "prefix": prefix}))

    def _wal(self, name: str) -> Path:
        root = self.config.wal_dir or (self.config.data / ".wal" if self.config.data else None)
        assert root is not None
        return root / name

    def _exists(self, name: str) -> bool:
        """Whether the index has a manifest, without creating anything (a local store makes
        its directory when opened: probing unknown names must not)."""
        if self.config.data is not None and not (self.config.data / name / "manifests").is_dir():
            return False
        return ManifestLog(self._store(name)).latest() is not None

    def _mine(self, name: str) -> None:
        """404 for an index this process does not serve (``ServeConfig.only``)."""
        only = self.config.only
        if only is not None and name != only:
            raise NotFoundError(f"no index named {name!r}: this server serves only {only!r}")

    def discover(self) -> list[str]:
        """Names of the indexes that exist under the data location (with ``only``: that one,
        when it exists; nothing else is listed or opened)."""
        if self.config.only is not None:
            return [self.config.only] if self._exists(self.config.only) else []
        if self.config.data is not None:
            root = self.config.data
            if not root.exists():
                return []
            return sorted(
                p.name
                for p in root.iterdir()
                if NAME.fullmatch(p.name) and p.is_dir() and (p / "manifests").is_dir()
            )
        assert self.config.s3 is not None
        lister = S3Store(self.config.s3)
        names = {o.key.split("/")[0] for o in lister.list("") if o.key.endswith("/" + LATEST_HINT)}
        # only valid index names: a sharded index's shards live under `_shards/` (shards.py)
        # and dot-directories hold the WAL and caches; none of them is an index here
        return sorted(n for n in names if NAME.fullmatch(n))

    def open_existing(self) -> None:
        for name in self.discover():
            self._open(name, None, None)

    def _open(
        self, name: str, create: IndexSpec | None, settings: IndexSettings | None
    ) -> IndexRuntime:
        store = self._store(name)
        writer = None
        if self.config.roles.writer:
            writer = IndexWriter.open(
                store,
                self._wal(name),
                self.config.writer,
                create=create,
                settings=settings.to_json() if settings else None,
            )
        elif ManifestLog(store).latest() is None:
            raise NotFoundError(f"index {name!r} does not exist")
        rt = IndexRuntime(name, store, writer, self.config.options, self.config.roles, self.hooks)
        rt.start()
        self.runtimes[name] = rt
        init = getattr(self.hooks, "init_index", None)
        if init is not None:
            init(name)
        return rt

    def create(
        self,
        name: str,
        model: str,
        dim: int,
        metric: str = "cosine",
        key_type: str = "str",
        settings: dict[str, Any] | None = None,
    ) -> IndexRuntime:
        check_name(name)
        self._mine(name)
        if not self.config.roles.writer:
            raise ConflictError("this replica is not a writer; create indexes on the writer")
        spec = IndexSpec(name, key_type, {model: ModelSpec(dim, metric)}, (model,))  # type: ignore[arg-type]
        parsed = IndexSettings.from_json(settings or {}, dim)
        with self._lock:
            if name in self.runtimes or self._exists(name):
                raise ConflictError(f"index {name!r} already exists")
            return self._open(name, spec, parsed)

    def get(self, name: str) -> IndexRuntime:
        self._mine(name)
        rt = self.runtimes.get(name)
        if rt is None and not self.config.roles.writer and not self.closing:
            # readers and shadows may start before the writer creates the index
            with self._lock:
                rt = self.runtimes.get(name)
                if rt is None and NAME.fullmatch(name) and self._exists(name):
                    rt = self._open(name, None, None)
        if rt is None:
            raise NotFoundError(f"no index named {name!r}")
        return rt

    def delete(self, name: str) -> int:
        """Stop the index's runtime (its threads joined, the writer closed), then delete every
        stored object and the WAL; returns the number of objects deleted. Writers only."""
        from index_runtime.jobs import purge_store

        check_name(name)
        self._mine(name)
        if not self.config.roles.writer:
            raise ConflictError("this replica is not a writer; delete indexes on the writer")
        with self._lock:
            rt = self.runtimes.pop(name, None)
            if rt is None and not self._exists(name):
                raise NotFoundError(f"no index named {name!r}")
            if rt is not None:
                rt.stop()
            n = purge_store(self._store(name))
            shutil.rmtree(self._wal(name), ignore_errors=True)
            if self.config.data is not None:
                shutil.rmtree(self.config.data / name, ignore_errors=True)  # empty directories
        log.info("deleted index %s (%d objects)", name, n)
        return n

    def encode(
        self, model: str, texts: list[str], kind: Kind = "passage", policy: RetryPolicy = REQUEST
    ) -> np.ndarray:
        """``texts`` encoded by ``model``'s encoder through its guard: transient failures are
        retried within ``policy``, then raise EncoderUnavailableError (503, Retry-After);
        permanent ones raise EncoderRejectedError (424) at once."""
        enc = self.encoders.get(model)
        if enc is None:
            raise InvalidInputError(
                f"this server has no encoder for model {model!r}; send vectors instead of text"
            )
        return self.guard(model).call(lambda: enc(texts, kind), policy)

    def guard(self, model: str) -> Guard:
        """The retries and circuit breaker of ``model``'s encoder (one per model, shared by
        every caller in this process)."""
        with self._guards_lock:
            g = self._guards.get(model)
            if g is None:
                g = self._guards[model] = Guard(model, self.config.encoder_breaker, self.hooks)
            return g

    def encoder_fn(self, model: str) -> Encoder:
        """``model``'s encoder for a migration: patient retries (an outage of minutes)."""
        return lambda texts, kind: self.encode(model, texts, kind, BACKGROUND)

    def resume_migrations(self) -> None:
        """A writer that restarts mid-migration continues it from its last commit, from any
        phase (when it has both models' encoders; otherwise the job says what is missing)."""
        for rt in self.runtimes.values():
            rec = rt.record if rt.writer is not None else None
            if rec is None or not rec.active:
                continue
            old, new = (
                self.encoder_fn(m) if m in self.encoders else None
                for m in (rec.from_model, rec.to_model)
            )
            rt.migrator.resume_on_start(old, new)

    def close(self) -> None:
        """Graceful stop: every writer flushes and commits what it acknowledged."""
        self.closing = True
        for rt in list(self.runtimes.values()):
            try:
                rt.stop()
            except Exception:
                log.exception("stopping %s failed", rt.name)
