"""The operator stopped and restarted at every phase of a migration (kopf in-process against
the stricter KMock emulator, Jobs as local processes, a real runtime on loopback; see
test_operator.py): the migration still ends Succeeded — or RolledBack when asked — and every
Job exists once (the names are deterministic and the sequence numbers live in the CR's
status, so a restarted operator finds what it created).

While the operator restarts, the new model's encoder is held (the runtime's migration waits
at its next encoding), so each restart happens in the phase the CR showed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")

import kopf

from index_operator.controller import Controller, OperatorConfig
from index_operator.handlers import registry
from index_runtime.service.engine import Engine
from tests.integration.test_migration_service import W_NEW, corpus, encoder
from tests.integration.test_operator import (  # noqa: F401  (fixtures)
    D_NEW,
    D_OLD,
    NS,
    Cluster,
    adopt_tokens,
    bearer,
    cluster,
    migration,
    model,
    new_model_url,
    runtime,
    vector_index,
)
from tests.kube_harness import JobRunner
from tests.strict_api import StrictAPI

# about 2 minutes on a loaded 2-core machine (a dozen kopf stops): the slow suite
pytestmark = [pytest.mark.kmock(cls=StrictAPI), pytest.mark.asyncio, pytest.mark.slow]
TERMINAL = ("Succeeded", "Failed", "RolledBack")


def held(encode: Callable[[list[str], str], Any], released: threading.Event) -> Any:
    """The encoder, waiting while ``released`` is clear (bounded: a test never hangs)."""

    def run(texts: list[str], kind: str) -> Any:
        released.wait(60)
        return encode(texts, kind)

    return run


class Counting(Controller):
    """The operator's controller, counting the migration passes it completed (by CR name)."""

    def __init__(self, config: OperatorConfig) -> None:
        super().__init__(config)
        self.passes: dict[str, int] = {}

    async def reconcile_migration(self, body: Any, *args: Any, **kwargs: Any) -> Any:
        out = await super().reconcile_migration(body, *args, **kwargs)
        name = str(body["metadata"]["name"])
        self.passes[name] = self.passes.get(name, 0) + 1
        return out


class Operator:
    """The operator in a thread of its own with its own event loop, restartable. (kopf, when
    it stops, cancels every task started in its loop while it ran: in the test's loop that
    would include the job runner's.)"""

    def __init__(self, cl: Cluster) -> None:
        self.cl = cl
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.restarts: list[str] = []
        self.controller: Counting | None = None

    async def start(self) -> None:
        config = OperatorConfig(interval_s=0.5, runtime_url=self.cl.url)
        self.controller = Counting(config)
        memo = kopf.Memo(
            server=str(self.cl.kmock.url).rstrip("/"), config=config, controller=self.controller
        )
        self.stop_flag = threading.Event()
        flag = self.stop_flag

        def run() -> None:
            asyncio.run(
                kopf.operator(
                    registry=registry,
                    clusterwide=True,
                    standalone=True,
                    memo=memo,
                    stop_flag=flag,
                )
            )

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        if self.thread is not None:
            self.stop_flag.set()
            await asyncio.to_thread(self.thread.join, 60)
            assert not self.thread.is_alive(), "the operator did not stop"
            self.thread = None

    async def restart(self, phase: str) -> None:
        await self.stop()
        self.restarts.append(phase)
        await self.start()

    async def passed(self, name: str, timeout: float = 60) -> None:
        """Until the running operator has completed a pass over migration ``name``."""
        deadline = time.monotonic() + timeout
        while not (self.controller and self.controller.passes.get(name)):
            assert time.monotonic() < deadline, f"the restarted operator never passed {name}"
            await asyncio.sleep(0.05)


async def patch_spec(cl: Cluster, name: str, spec: dict[str, Any]) -> None:
    """kubectl patch --type merge (a spec change: the emulator bumps the generation)."""
    async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
        r = await k.patch(
            f"/apis/driftless.dev/v1alpha1/namespaces/{NS}/modelmigrations/{name}",
            json={"spec": spec},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert r.status_code < 400, r.text


async def walk(
    cl: Cluster,
    op: Operator,
    released: threading.Event,
    name: str,
    then: dict[str, Callable[[], Awaitable[None]]],
    timeout: float = 120,
) -> dict[str, Any]:
    """Follow the ModelMigration; at every phase it shows for the first time, stop the
    operator and start a new one, then run ``then[phase]`` once. Returns the final status.
    The runtime is held until the new operator has made its first pass over the CR: on a
    loaded machine kopf takes seconds to start, and a runtime let go at once could move
    through the next phases (Bridged, Backfilling) before any operator looked (seen in CI)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = (cl.get("modelmigrations", name) or {}).get("status") or {}
        phase = str(st.get("phase") or "")
        if phase and phase not in seen:
            seen.append(phase)
            if phase in TERMINAL:
                return st
            released.clear()
            try:
                await op.restart(phase)
                await op.passed(name)
            finally:
                released.set()
            action = then.pop(phase, None)
            if action is not None:
                await action()
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name}: no end after phases {seen}")


def jobs_of(cl: Cluster, prefix: str) -> list[str]:
    return sorted(
        key[2]
        for key in list(cl.kmock.objects)
        if getattr(key[0], "plural", "") == "jobs" and key[2].startswith(prefix)
    )


async def test_operator_restarted_at_every_phase_rollback_then_success(
    cluster: tuple[Cluster, JobRunner],  # noqa: F811  (the fixture imported above)
    runtime: tuple[str, Engine, str],  # noqa: F811
    new_model_url: str,  # noqa: F811
    moto_endpoint: str,
    tmp_path: Path,
) -> None:
    cl, runner = cluster
    url, engine, bucket = runtime
    released = threading.Event()
    released.set()
    engine.encoders["new"] = held(encoder(W_NEW, 0.0), released)
    await cl.put(model("old", D_OLD))
    new = model("new", D_NEW)  # the backfill's worker pods encode with it themselves
    new["spec"]["encoder"]["http"]["url"] = new_model_url
    await cl.put(new)
    ix = vector_index("docs", bucket, moto_endpoint)
    ix["spec"]["coldStart"] = {"minTrainingVectors": 100_000}  # no training: not under test
    await cl.put(ix)
    op = Operator(cl)
    await op.start()
    try:
        await cl.wait("secrets", "docs-token-hashes", lambda _: True, 60, "token hashes")
        tokens = adopt_tokens(cl, engine, "docs", tmp_path)
        await cl.wait(
            "vectorindexes", "docs", lambda s: s.get("phase") == "ColdStart", 120, "cold start"
        )
        with httpx.Client(base_url=url, timeout=30, headers=bearer(tokens["write"])) as c:
            r = c.post(
                "/v1/indexes/docs/upsert",
                json={"keys": [f"k{i}" for i in range(800)], "texts": corpus(800)},
            )
            assert r.status_code == 200, r.text
        spec = {
            "adapter": {"types": ["procrustes"], "pairs": 600},
            "backfill": {"batch": 100, "rate": 400},  # about 2 s: the CR shows Backfilling
            "cutover": {"policy": "Manual"},  # it waits in Backfilled: a restart there too
        }

        # 1. rolled back when asked (in the backfill, or once backfilled)
        async def rollback() -> None:
            await patch_spec(cl, "rb", {"rollback": True})

        await cl.put(migration("rb", "docs", **spec))
        st = await walk(
            cl, op, released, "rb", {"Backfilling": rollback, "Backfilled": rollback}
        )
        assert (st["phase"], st["reason"]) == ("RolledBack", "RollbackRequested"), st
        assert {"Pending", "Bridged"} <= set(op.restarts), op.restarts

        # 2. a new migration to the same model starts afresh (not RolledBack on its first
        # pass) and, restarted at every phase, cuts over once approved
        async def approve() -> None:
            await patch_spec(cl, "to-new", {"cutover": {"approved": True}})

        await cl.put(migration("to-new", "docs", **spec))
        op.restarts.clear()
        st = await walk(cl, op, released, "to-new", {"Backfilled": approve})
        assert st["phase"] == "Succeeded", st
        assert {"Pending", "Bridged", "Backfilled"} <= set(op.restarts), op.restarts
        assert st["progress"]["share"] == 1.0
        # every Job once: no replacement was needed, and no restart created a second one
        assert jobs_of(cl, "rb-") == ["rb-backfill", "rb-migrate"] or jobs_of(cl, "rb-") == [
            "rb-migrate"
        ]
        assert jobs_of(cl, "to-new-") == ["to-new-backfill", "to-new-migrate"]
        deadline = time.monotonic() + 60  # the gate Job polls its operation: it ends last
        while not all(j in runner.started for j in jobs_of(cl, "to-new-")):
            assert time.monotonic() < deadline, (
                runner.started,
                [(cl.get("jobs", j) or {}).get("status") for j in jobs_of(cl, "to-new-")],
            )
            await asyncio.sleep(0.2)
        assert all(runner.started.get(j) == 0 for j in jobs_of(cl, "to-new-")), {
            j: runner.log(j)[-800:] for j in jobs_of(cl, "to-new-")
        }
        with httpx.Client(base_url=url, timeout=30, headers=bearer(tokens["read"])) as c:
            doc = c.post("/v1/indexes/docs/search", json={"text": corpus(1)[0], "k": 3})
            assert doc.status_code == 200, doc.text
        assert np.isfinite(st["textCoverage"])
    finally:
        released.set()
        await op.stop()
