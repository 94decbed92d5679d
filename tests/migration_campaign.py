"""The long model migration under faults (issue 15 item 6): seeded trials, each a
``driftless serve`` subprocess migrating a few thousand rows with text from ``old`` to ``new``
(tests/fake_encoder.py over HTTP) while client threads upsert, delete and query, and the
writer is SIGKILLed at random moments and restarted.

Per trial: the backfill is throttled by the request's ``backfill_rate`` (rows/s), so it takes
``rows / rate`` seconds; kills fall at uniform random delays inside the kill window (record
phases ``KILL_PHASES``: by default every active phase, the gate's included, since the runner
resumes from any committed step; narrow it with ``DRIFTLESS_CAMPAIGN_KILL_PHASES=Backfilling``).
``Trial.killers`` maps a name to a kill action: ``writer`` here; backfill workers and the
operator can be added (each kill picks one at random). At the end:

* the migration is ``Succeeded``;
* no acknowledged write is lost and no deleted row is back (per key, the text shown must be
  that of its last acknowledged op, or of a later unacknowledged one — as in fault_campaign);
* every live row has a new-model vector, equal to the new model's encoding of its *current*
  text (a stale rewrite of an older version would show here), and the index has one model;
* served quality never measured below the status quo: at every checkpoint of the record's
  curve (collected from each status poll, not only the last 50), the served strategy's paired
  gain over the status quo has a 95% upper bound >= 0.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from index_runtime.store.objects import LocalDirStore
from index_runtime.store.reader import Snapshot
from tests.fake_encoder import VOCAB, EncoderServer, encode
from tests.service_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "campaign-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INDEX = "docs"
KILL_PHASES = tuple(
    p for p in os.environ.get(
        "DRIFTLESS_CAMPAIGN_KILL_PHASES",
        "Pending,SamplingPairs,TrainingAdapter,Evaluating,Bridged,Backfilling,Backfilled",
    ).split(",") if p
)
TERMINAL = ("Succeeded", "Failed", "RolledBack")


@dataclass(frozen=True)
class Config:
    rows: int = 1200  # corpus rows with text; keys 0 .. rows-1
    labelled: int = 150  # keys 0 .. labelled-1: labelled queries' targets, never mutated
    fresh: int = 300  # keys the mutators may create: rows .. rows+fresh-1
    backfill_rate: float = 100.0  # rows/s: a backfill of ~rows/rate s
    backfill_batch: int = 40
    pairs: int = 600  # rows the gate samples
    kills: tuple[int, int] = (1, 2)  # SIGKILLs per trial, uniform in [lo, hi]
    mutators: int = 2
    pause_s: float = 0.1  # between a client thread's requests
    parallel: int = 2  # trials at once (each its own writer process)
    timeout_s: float = 240.0


@dataclass
class Outcome:
    seed: int
    phase: str = ""
    kills: list[dict[str, Any]] = field(default_factory=list)
    acked_upserts: int = 0
    acked_deletes: int = 0
    failed_ops: int = 0
    lost: list[int] = field(default_factory=list)
    resurrected: list[int] = field(default_factory=list)
    without_new_vector: int = 0
    wrong_new_vector: int = 0
    live_rows: int = 0
    models: list[str] = field(default_factory=list)
    selected: str = ""
    checkpoints: int = 0
    below_status_quo: int = 0  # checkpoints whose served gain's upper bound < 0
    min_served_gain: float = float("nan")  # lowest mean paired gain over the checkpoints
    queries_ok: int = 0
    queries_failed: int = 0
    backfill_s: float = 0.0
    seconds: float = 0.0
    timeline: list[tuple[str, float]] = field(default_factory=list)  # (event, s since start)

    @property
    def ok(self) -> bool:
        return (
            self.phase == "Succeeded"
            and not self.lost
            and not self.resurrected
            and not self.without_new_vector
            and not self.wrong_new_vector
            and self.models == ["new"]
            and self.checkpoints > 0
            and self.below_status_quo == 0
        )


def words(rng: random.Random, n: int = 10) -> str:
    return " ".join(f"w{rng.randrange(VOCAB)}" for _ in range(n))


class Writer:
    """``driftless serve`` on ``data``, restartable on the same port."""

    def __init__(self, data: Path, encoders: dict[str, str], log: Path) -> None:
        self.data, self.port, self.log = data, free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "DRIFTLESS_ADMIN_TOKEN": TOKEN,
            "DRIFTLESS_ENCODERS": json.dumps(encoders),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "index_runtime.cli", "serve", "--data", str(self.data)]
        cmd += ["--port", str(self.port), "--tick", "0.5"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the writer did not become ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM: drain, flush, commit; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(90)


class Mutator(threading.Thread):
    """Upserts (new text versions) and deletes on its own keys, one op at a time; each op is
    acknowledged (200) or not (error, timeout, writer down)."""

    def __init__(
        self, url: str, keys: list[int], texts: dict[int, str], seed: int, pause_s: float
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.keys, self.rng, self.pause_s = url, keys, random.Random(seed), pause_s
        # op 0: the initial load of the corpus keys it owns (acknowledged)
        self.ops: list[tuple[str, dict[int, str | None]]] = [
            ("upsert", {k: texts[k] for k in keys if k in texts})
        ]
        self.acked: list[bool] = [True]
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10, headers=AUTH) as c:
            while not self.stop.is_set():
                i = len(self.ops)
                chosen = self.rng.sample(self.keys, self.rng.choice([1, 2, 5]))
                if self.rng.random() < 0.65:
                    texts = {k: f"{words(self.rng)} #{k}v{i}" for k in chosen}
                    body: dict[str, Any] = {"keys": chosen, "texts": list(texts.values())}
                    op: tuple[str, dict[int, str | None]] = ("upsert", dict(texts))
                    path = "upsert"
                else:
                    body, op, path = {"keys": chosen}, ("delete", dict.fromkeys(chosen)), "delete"
                self.ops.append(op)
                try:
                    ok = c.post(f"/v1/indexes/{INDEX}/{path}", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.acked.append(ok)
                self.stop.wait(self.pause_s if ok else 0.2)  # not ok: the writer is restarting

    def allowed(self, key: int) -> tuple[set[str | None], str]:
        """Texts ``key`` may show (None: absent) and its last acknowledged op's kind."""
        touching = [i for i, (_, keys) in enumerate(self.ops) if key in keys]
        last = max((i for i in touching if self.acked[i]), default=None)
        allowed = {self.ops[last][1][key] if last is not None else None}
        allowed |= {self.ops[i][1][key] for i in touching if last is None or i > last}
        return allowed, "none" if last is None else self.ops[last][0]


class Querier(threading.Thread):
    def __init__(self, url: str, queries: list[str], pause_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.queries, self.pause_s = url, queries, pause_s
        self.ok = self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10, headers=AUTH) as c:
            i = 0
            while not self.stop.is_set():
                try:
                    q = {"text": self.queries[i % len(self.queries)], "k": 10}
                    r = c.post(f"/v1/indexes/{INDEX}/search", json=q)
                    good = r.status_code == 200
                except httpx.HTTPError:
                    good = False
                self.ok += good
                self.failed += not good
                i += 1
                self.stop.wait(self.pause_s if good else 0.2)


class Trial:
    """One seeded trial (see the module docstring)."""

    def __init__(self, seed: int, encoders: EncoderServer, tmp: Path, cfg: Config) -> None:
        self.seed, self.cfg, self.rng = seed, cfg, random.Random(seed)
        self.writer = Writer(tmp / "data", encoders.specs(), tmp / "writer.log")
        self.out = Outcome(seed)
        self.curve: dict[str, dict[str, Any]] = {}  # checkpoints seen, by their JSON
        self.killers: dict[str, Callable[[], None]] = {"writer": self._kill_writer}
        self.texts: dict[int, str] = {}

    def record(self) -> dict[str, Any]:
        try:
            r = httpx.get(f"{self.writer.url}/v1/indexes/{INDEX}/status", headers=AUTH, timeout=5)
            rec = dict(r.json()["migration"]["record"] or {}) if r.status_code == 200 else {}
        except httpx.HTTPError:
            return {}
        for point in rec.get("curve", []):
            self.curve[json.dumps(point, sort_keys=True)] = point
        return rec

    def wait_phase(self, phases: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rec = self.record()
            if rec.get("phase") in phases:
                return rec
            time.sleep(0.1)
        raise AssertionError(f"seed {self.seed}: no phase in {phases}: {self.record()}")

    def mark(self, event: str) -> None:
        self.out.timeline.append((event, round(time.perf_counter() - self.t0, 2)))

    def _kill_writer(self) -> None:
        self.writer.kill()
        self.mark("killed")
        self.writer.start()
        self.mark("restarted")

    def run(self) -> Outcome:
        self.t0 = t0 = time.perf_counter()
        cfg, rng = self.cfg, self.rng
        texts = self.texts = {k: words(rng) for k in range(cfg.rows)}
        labelled = [{"text": " ".join(texts[k].split()[:6]), "key": k} for k in range(cfg.labelled)]
        self.writer.start()
        self.mark("ready")
        try:
            with httpx.Client(base_url=self.writer.url, timeout=60, headers=AUTH) as c:
                settings = {"lifecycle": {"tau": 1 << 30}, "oracle": {"sample_rate": 0.0}}
                spec = {"name": INDEX, "model": "old", "dim": 32, "key_type": "int"}
                r = c.post("/v1/indexes", json={**spec, "settings": settings})
                assert r.status_code == 201, r.text
                for lo in range(0, cfg.rows, 1000):
                    ks = list(range(lo, min(cfg.rows, lo + 1000)))
                    rows = {"keys": ks, "texts": [texts[k] for k in ks]}
                    r = c.post(f"/v1/indexes/{INDEX}/upsert", json=rows)
                    assert r.status_code == 200, r.text
            mutable = list(range(cfg.labelled, cfg.rows + cfg.fresh))
            muts = [
                Mutator(
                    self.writer.url,
                    mutable[i :: cfg.mutators],
                    texts,
                    self.seed * 100 + i,
                    cfg.pause_s,
                )
                for i in range(cfg.mutators)
            ]
            querier = Querier(self.writer.url, [q["text"] for q in labelled], cfg.pause_s)
            for t in (*muts, querier):
                t.start()
            body = {
                "to_model": "new", "kinds": ["procrustes"], "labelled": labelled,
                "min_labelled": 100, "seed": self.seed, "pairs": cfg.pairs, "backfill_batch": cfg.backfill_batch,
                "backfill_rate": cfg.backfill_rate,
            }
            url = f"{self.writer.url}/v1/indexes/{INDEX}/admin/migrations"
            r = httpx.post(url, json=body, headers=AUTH, timeout=30)
            assert r.status_code == 202, r.text
            self.mark("migration started")
            self._chaos()
            rec = self.wait_phase(TERMINAL, cfg.timeout_s)
            for t in (*muts, querier):
                t.stop.set()
            for t in (*muts, querier):
                t.join(30)
            self.out.phase, self.out.selected = str(rec["phase"]), str(rec.get("selected"))
            assert self.writer.stop() == 0, self.writer.log.read_text()[-3000:]
            self.mark("stopped")
            self._check(muts, querier, rec)
        finally:
            if self.writer.proc is not None and self.writer.proc.poll() is None:
                self.writer.kill()
        self.out.seconds = time.perf_counter() - t0
        return self.out

    def _chaos(self) -> None:
        """Kills at uniform random delays while the record is in a kill phase."""
        cfg, rng = self.cfg, self.rng
        n = rng.randint(*cfg.kills)
        span = cfg.rows / cfg.backfill_rate  # the backfill's length without kills
        started = None
        for _ in range(n):
            rec = self.wait_phase((*KILL_PHASES, *TERMINAL), cfg.timeout_s)
            if started is None:
                self.mark(f"{rec.get('phase')} seen")
            started = started or time.monotonic()
            if rec.get("phase") in TERMINAL:
                break
            time.sleep(rng.uniform(0.2, span / n))
            rec = self.record()
            if rec.get("phase") not in KILL_PHASES:
                continue  # the window closed meanwhile
            name = rng.choice(sorted(self.killers))
            bf = rec.get("backfill") or {}
            self.killers[name]()
            share = round(float(bf.get("share", 0.0)), 3)
            self.out.kills.append({"who": name, "phase": rec["phase"], "share": share})
        self.wait_phase(TERMINAL, cfg.timeout_s)
        self.mark("terminal")
        self.out.backfill_s = time.monotonic() - (started or time.monotonic())

    def _check(self, muts: list[Mutator], querier: Querier, rec: dict[str, Any]) -> None:
        out = self.out
        snap = Snapshot.open(LocalDirStore(self.writer.data / INDEX))
        out.models = sorted(snap.manifest.index.models)
        rows = snap.live.as_dict()
        out.live_rows = len(rows)
        owner = {k: m for m in muts for k in m.keys}
        for m in muts:
            for i, (kind, keys) in enumerate(m.ops[1:], 1):
                if m.acked[i]:
                    out.acked_upserts += len(keys) * (kind == "upsert")
                    out.acked_deletes += len(keys) * (kind == "delete")
                else:
                    out.failed_ops += 1
        for key in range(self.cfg.rows + self.cfg.fresh):
            shown = rows[key][1] if key in rows else None
            if key in owner:
                allowed, last = owner[key].allowed(key)
                if shown not in allowed:
                    (out.resurrected if last == "delete" else out.lost).append(key)
            elif shown != self.texts[key]:  # labelled targets: never mutated
                out.lost.append(key)
        for _key, (vecs, text, _) in rows.items():
            if "new" not in vecs:
                out.without_new_vector += 1
            elif not np.allclose(vecs["new"], encode("new", [str(text)], "passage")[0], atol=1e-4):
                out.wrong_new_vector += 1
        gains = [p["test_gain_vs_status_quo"]["served"] for p in self.curve.values()]
        out.checkpoints = len(gains)
        out.below_status_quo = sum(g["high"] < 0 for g in gains)
        out.min_served_gain = min((g["mean"] for g in gains), default=float("nan"))
        out.queries_ok, out.queries_failed = querier.ok, querier.failed


def campaign(trials: int, tmp: Path, cfg: Config = Config(), first_seed: int = 0) -> list[Outcome]:
    from concurrent.futures import ThreadPoolExecutor

    from tests.fake_encoder import encoder_server

    def one(seed: int) -> Outcome:
        d = tmp / f"trial-{seed}"
        d.mkdir(parents=True)
        return Trial(seed, enc, d, cfg).run()

    with encoder_server() as enc, ThreadPoolExecutor(cfg.parallel) as pool:
        return list(pool.map(one, range(first_seed, first_seed + trials)))


def table(outs: list[Outcome], cfg: Config, command: str) -> str:
    lines = [
        "# The long migration under faults",
        "",
        f"Command: `{command}`",
        "",
        f"{cfg.rows} rows with text (+ up to {cfg.fresh} new keys), {cfg.parallel} trials at "
        f"once (one writer process each), backfill throttled to "
        f"{cfg.backfill_rate:.0f} rows/s, {cfg.mutators} mutator threads + 1 query thread, "
        f"{cfg.kills[0]}-{cfg.kills[1]} SIGKILLs of the writer per trial in phases "
        f"{', '.join(KILL_PHASES)}. Lost/back: acknowledged writes missing / deleted rows "
        "visible; no new vec / wrong: live rows without a new-model vector / with one that is "
        "not the encoding of their current text; ≤ SQ: checkpoints whose served gain over the "
        "status quo has a 95% upper bound < 0.",
        "",
        "| seed | phase | gate selected | kills (phase@share) | acked upserts | acked deletes | failed ops | lost | back | "
        "no new vec | wrong | live rows | checkpoints | ≤ SQ | min gain | queries ok/failed | s |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for o in outs:
        kills = ", ".join(f"{k['who']}@{k['phase']}:{k['share']:.2f}" for k in o.kills) or "—"
        lines.append(
            f"| {o.seed} | {o.phase} | {o.selected} | {kills} | {o.acked_upserts} | {o.acked_deletes} | "
            f"{o.failed_ops} | {len(o.lost)} | {len(o.resurrected)} | {o.without_new_vector} | "
            f"{o.wrong_new_vector} | {o.live_rows} | {o.checkpoints} | {o.below_status_quo} | "
            f"{o.min_served_gain:+.3f} | {o.queries_ok}/{o.queries_failed} | {o.seconds:.0f} |"
        )
    n_ok = sum(o.ok for o in outs)
    kills = sum(len(o.kills) for o in outs)
    lines += ["", f"{n_ok}/{len(outs)} trials passed every check; {kills} SIGKILLs in all."]
    return "\n".join(lines) + "\n"


def write_results(outs: list[Outcome], cfg: Config, out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, "config": asdict(cfg), "kill_phases": list(KILL_PHASES)}
    doc["trials"] = [{**asdict(o), "ok": o.ok} for o in outs]
    (out_dir / "migration_campaign.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "migration_campaign.md").write_text(table(outs, cfg, command))
