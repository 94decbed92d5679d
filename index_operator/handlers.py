"""kopf registrations: a switchboard, every body one call into ``controller``.

Level-based: a timer per object observes and reconciles; kopf indexes keep the
EmbeddingModels and ModelMigrations of each namespace in memory (no listing in handlers),
and the controller's watch cache keeps the children (``index_operator.cache``).
The operator only ever writes ``status`` (and its own bookkeeping annotations, under the
driftless.dev prefix); never ``spec``.

Finalizers only where deletion has work to do: a VectorIndex with ``reclaimPolicy: Delete``
(its data is purged first). kopf marks every timer as needing a finalizer (to stop the timer
before the object goes); ours need none (a pass over a deleted object changes nothing that
the garbage collector does not remove), so :func:`timers_without_finalizers` clears that
mark, and deleting anything else, or its namespace, does not wait for the operator.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
from kopf._core.intents.handlers import TimerHandler  # no public name in kopf 1.x

from index_operator.controller import Controller, OperatorConfig
from index_operator.reconcile.conditions import Condition, merge_conditions
from index_operator.reconcile.index import Event
from index_operator.reconcile.migration import TERMINAL
from index_operator.spec import FINALIZER, GROUP, VERSION, Model, SpecError

CONFIG = OperatorConfig.from_env()
registry = kopf.OperatorRegistry()
G, V = GROUP, VERSION


def controller(memo: Any) -> Controller:
    ctl: Controller = memo["controller"]
    return ctl


@kopf.on.startup(registry=registry)
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=G)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=G, key="last-handled-configuration"
    )
    settings.peering.name = "driftless"
    settings.posting.level = logging.WARNING  # our own Events say what happened
    settings.watching.server_timeout = 300
    # a VectorIndex deleted while its timer runs waits for the timer to end; kopf rechecks
    # every cancellation_polling seconds (60 by default): one reconcile interval is enough
    config: OperatorConfig = memo.get("config") or CONFIG
    settings.background.cancellation_polling = max(1.0, config.interval_s)
    timers_without_finalizers(registry, config.interval_s)
    memo.setdefault("controller", Controller(config))


@kopf.on.cleanup(registry=registry)
async def close(memo: kopf.Memo, **_: Any) -> None:
    await controller(memo).close()


@kopf.on.login(registry=registry)
async def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the ServiceAccount; elsewhere: the kubeconfig. Our client uses the same,
    and starts watching the children in the namespaces kopf serves (memo "namespaces";
    empty: cluster-wide)."""
    if memo.get("server"):  # tests: KMock's emulator
        info: kopf.ConnectionInfo | None = kopf.ConnectionInfo(server=memo["server"], insecure=True)
    else:
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        ctl = controller(memo)
        ctl.kube.configure(info)
        ctl.start_cache(memo.get("namespaces") or ())
    return info


# indexes: what the handlers would otherwise list ------------------------------------------


@kopf.index(G, V, "embeddingmodels", registry=registry)
def models_by_namespace(body: kopf.Body, namespace: str | None, **_: Any) -> Any:
    try:
        return {namespace: Model.parse(body)}
    except (KeyError, SpecError, ValueError):
        return None


def _active(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


# a finished migration stops matching the filter, which removes it from the index
@kopf.index(G, V, "modelmigrations", when=_active, registry=registry)
def migrations_by_index(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    **_: Any,
) -> Any:
    created = str(body.metadata.get("creationTimestamp") or "")
    return {(namespace, spec.get("indexRef", {}).get("name", "")): (created, name)}


@kopf.index(G, V, "modelmigrations", when=_active, registry=registry)
def migration_targets(body: kopf.Body, spec: kopf.Spec, namespace: str | None, **_: Any) -> Any:
    """(namespace, index) -> (creationTimestamp, name, target model) of unfinished
    migrations (ordered as ``migrations_by_index``: the first one runs)."""
    created = str(body.metadata.get("creationTimestamp") or "")
    key = (namespace, spec.get("indexRef", {}).get("name", ""))
    target = str(spec.get("targetModelRef", {}).get("name", ""))
    return {key: (created, str(body.metadata.get("name", "")), target)}


def _running_target(indexes: Mapping[str, Any], namespace: str | None, index: str) -> str:
    """The target model of the index's running (oldest unfinished) migration, or ''."""
    targets: kopf.Index[tuple[str | None, str], tuple[str, str, str]]
    targets = indexes["migration_targets"]
    found = sorted(targets.get((namespace, index), []))
    return found[0][2] if found else ""


def _models(indexes: Mapping[str, Any], namespace: str | None) -> dict[str, Model]:
    """The namespace's EmbeddingModels (kopf passes its indexes as keyword arguments)."""
    index: kopf.Index[str | None, Model] = indexes["models_by_namespace"]
    return {m.name: m for m in index.get(namespace, [])}


def _active_migrations(
    indexes: Mapping[str, Any], namespace: str | None, index: str
) -> list[tuple[str, str]]:
    """The index's unfinished ModelMigrations as (creationTimestamp, name), oldest first: the
    first one runs, later ones wait."""
    by_index: kopf.Index[tuple[str | None, str], tuple[str, str]] = indexes["migrations_by_index"]
    return sorted(by_index.get((namespace, index), []))


def _post(body: kopf.Body, events: list[Event]) -> None:
    for e in events:
        kopf.event(body, type=e.type, reason=e.reason, message=e.message)


def _merge_value(new: Any, old: Any) -> Any:
    """A merge patch keeps keys it does not mention: clear the ones the new value dropped."""
    if isinstance(new, Mapping) and isinstance(old, Mapping):
        out = {k: _merge_value(v, old.get(k)) for k, v in new.items()}
        out.update({k: None for k in old if k not in new})
        return out
    return new


def _write(patch: kopf.Patch, status: Mapping[str, Any], prior: Mapping[str, Any]) -> None:
    for k, v in status.items():
        if prior.get(k) != v:
            patch.status[k] = _merge_value(v, prior.get(k))


# EmbeddingModel ---------------------------------------------------------------------------


@kopf.on.resume(G, V, "embeddingmodels", registry=registry)
@kopf.on.create(G, V, "embeddingmodels", registry=registry)
@kopf.on.update(G, V, "embeddingmodels", registry=registry)
def model_accepted(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
    gen = int(body.metadata.get("generation") or 1)

    try:
        m = Model.parse(body)
        cond = Condition(
            "Ready", True, "Accepted", f"{m.dimension}-d {m.metric}, encoder {m.encoder}"
        )
        patch.status["encoder"] = m.encoder
    except (KeyError, SpecError, ValueError) as exc:
        cond = Condition("Ready", False, "InvalidSpec", str(exc))
    patch.status["observedGeneration"] = gen
    patch.status["conditions"] = merge_conditions(
        status.get("conditions"), [cond], gen, time.time()
    )


# VectorIndex ------------------------------------------------------------------------------


def _purges(spec: kopf.Spec, **_: Any) -> bool:
    """Deleting this VectorIndex has work to do (its data is purged): it gets a finalizer."""
    return bool((spec.get("storage") or {}).get("reclaimPolicy") == "Delete")


@kopf.timer(G, V, "vectorindexes", interval=CONFIG.interval_s, initial_delay=0, registry=registry)
async def index_timer(
    body: kopf.Body,
    status: kopf.Status,
    patch: kopf.Patch,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    **kwargs: Any,  # kopf passes the indexes by name
) -> None:
    if body.metadata.get("deletionTimestamp"):
        return
    active = _active_migrations(kwargs, namespace, name)
    ctl = controller(memo)
    with ctl.metrics.reconcile("VectorIndex"):
        new, events = await ctl.reconcile_index(
            body,
            _models(kwargs, namespace),
            active[0][1] if active else "",
            _running_target(kwargs, namespace, name),
        )
    _write(patch, new, status)
    _post(body, events)


@kopf.on.delete(G, V, "vectorindexes", when=_purges, registry=registry)
async def index_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    waiting, events = await controller(memo).finalize_index(body)
    _post(body, events)
    if waiting:
        raise kopf.TemporaryError(waiting, delay=max(1.0, CONFIG.interval_s / 2))


# ModelMigration ---------------------------------------------------------------------------


@kopf.timer(G, V, "modelmigrations", interval=CONFIG.interval_s, initial_delay=0, registry=registry)
async def migration_timer(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    patch: kopf.Patch,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    **kwargs: Any,  # kopf passes the indexes by name
) -> None:
    if status.get("phase") in TERMINAL:
        return
    active = _active_migrations(kwargs, namespace, spec.get("indexRef", {}).get("name", ""))
    mine = (str(body.metadata.get("creationTimestamp") or ""), name)
    earlier = [m for c, m in active if (c, m) < mine]
    ctl = controller(memo)
    with ctl.metrics.reconcile("ModelMigration"):
        new, events = await ctl.reconcile_migration(
            body, _models(kwargs, namespace), earlier[0] if earlier else ""
        )
    _write(patch, new, status)
    _post(body, events)


def timers_without_finalizers(reg: kopf.OperatorRegistry, interval_s: float = 0) -> None:
    """kopf (1.37 to 1.45 at least) registers every timer with ``requires_finalizer=True``
    and offers no option: replace each timer's registration with one that needs none (and,
    given ``interval_s``, runs at the configured interval rather than the one read from the
    environment at import). A timer that raised keeps kopf's backoff (60 s): retried at the
    interval, the orphaned timers of a stopped operator (kopf leaves a timer that does not
    exit in time running) most likely kept reconciling beside its successor: the slow suite's
    operator-restart walk missed phases in 1 of 2 runs (3 of 3 passed with 60 s).
    ``tests/unit/test_operator_finalizers.py`` fails if a kopf upgrade changes this."""
    spawning = reg._spawning
    spawning._handlers[:] = [
        dataclasses.replace(
            h,
            requires_finalizer=False,
            interval=interval_s or h.interval,
        )
        if isinstance(h, TimerHandler)
        else h
        for h in spawning._handlers
    ]


timers_without_finalizers(registry)
