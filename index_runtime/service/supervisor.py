"""``driftless serve --shards N``, the laptop form of a sharded index: N child ``serve``
processes (shard i stores under ``shards.shard_prefix(location, i, N)``, on a loopback port)
and the router in front. The supervisor restarts a child that died, with backoff; on SIGTERM
the router drains and the children are stopped gracefully (each flushes and commits).

A child asks the kernel for SIGTERM when the thread that started it dies
(``PR_SET_PDEATHSIG``, kept across exec), so a supervisor killed outright leaves no orphan
holding a writer's epoch and its port.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# runs the CLI in the child after asking for SIGTERM on the parent's death (Linux; elsewhere
# the child simply runs)
_SHIM = (
    "import ctypes, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"
    "except Exception:\n"
    "    pass\n"
    "from index_runtime.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@dataclass(frozen=True)
class Backoff:
    """Waits before restarting a dead child: ``first_s`` doubled per consecutive death up to
    ``max_s``; a child that lived ``reset_after_s`` starts again from ``first_s``."""

    first_s: float = 0.5
    max_s: float = 10.0
    reset_after_s: float = 30.0

    def next(self, previous_s: float | None, lived_s: float) -> float:
        if previous_s is None or lived_s >= self.reset_after_s:
            return self.first_s
        return min(self.max_s, previous_s * 2)


def argv_of(
    actions: Sequence[argparse.Action],
    args: argparse.Namespace,
    overrides: Mapping[str, Any],
    drop: frozenset[str] = frozenset(),
) -> list[str]:
    """The command line (after ``serve``) that gives a parser ``args`` with ``overrides``
    applied: every option whose value differs from its default, by its first flag. ``drop``:
    dests left out (they keep their defaults)."""
    out: list[str] = []
    for a in actions:
        if not a.option_strings or a.dest in drop or a.dest == "help":
            continue
        value = overrides.get(a.dest, getattr(args, a.dest, a.default))
        flag = (
            a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]
        )
        if isinstance(a, argparse._StoreTrueAction):
            if value:
                out.append(flag)
        elif value is not None and (a.dest in overrides or value != a.default):
            out += [flag, str(value)]
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Child:
    """One shard's ``serve`` process."""

    def __init__(self, shard: int, port: int, argv: list[str]) -> None:
        self.shard = shard
        self.port = port
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.wait_s: float | None = None  # the last backoff
        self.restart_at: float | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Supervisor:
    """Starts the children, restarts the dead ones (a monitor thread), stops them all."""

    def __init__(
        self,
        children: list[Child],
        env: Mapping[str, str],
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = children
        self.env = dict(env)
        self.backoff = backoff
        self.clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()  # spawning vs stopping
        self._thread = threading.Thread(target=self._monitor, name="supervisor", daemon=True)

    def _spawn(self, c: Child) -> None:
        c.proc = subprocess.Popen([sys.executable, "-c", _SHIM, "serve", *c.argv], env=self.env)
        c.started_at = self.clock()
        log.warning("shard %d: serve started (pid %d, port %d)", c.shard, c.proc.pid, c.port)

    def start(self) -> None:
        with self._lock:
            for c in self.children:
                self._spawn(c)
        self._thread.start()

    def _monitor(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                if self._stop.is_set():
                    return
                for c in self.children:
                    self.check(c)

    def check(self, c: Child) -> None:
        """Restart ``c`` if it died and its backoff has passed (under the lock)."""
        if c.proc is None or c.proc.poll() is None:
            return
        now = self.clock()
        if c.restart_at is None:
            c.wait_s = self.backoff.next(c.wait_s, now - c.started_at)
            c.restart_at = now + c.wait_s
            log.warning(
                "shard %d: serve exited with %s; restarting in %.1f s",
                c.shard,
                c.proc.returncode,
                c.wait_s,
            )
        if now >= c.restart_at:
            c.restart_at = None
            c.restarts += 1
            self._spawn(c)

    def stop(self, grace_s: float) -> None:
        """SIGTERM every child (each drains, flushes and commits), SIGKILL after ``grace_s``."""
        with self._lock:
            self._stop.set()
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = self.clock() + grace_s
        for p in live:
            try:
                p.wait(max(0.1, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                log.error("serve pid %d did not stop in %.0f s: killed", p.pid, grace_s)
                p.kill()
                p.wait()
