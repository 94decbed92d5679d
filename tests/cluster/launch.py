"""Run a container's process in a test Host: its netns, a private mount namespace, uid 10001.

`launch(host, spec)` starts::

    ip netns exec <ns> unshare --mount --propagation private -- \
        <python> -I -S <this file> <plan as JSON>

`ip netns exec` enters the Host's network namespace and bind-mounts /etc/netns/<ns>/* over
/etc/* (the hosts file the Network rewrites). `unshare` gives the process a private mount
namespace, so every mount below is invisible to the machine and vanishes with the process.
This file, run as a script (stdlib only, as root), is the container's init: it applies the
mount plan, chroots into an image rootfs if one is given, drops to uid/gid (what
`setpriv --reuid --regid --clear-groups` does: setgroups([]), setgid, setuid, which also
clears every capability), changes to the workdir and execs argv. Every step of that chain
execs, so `Proc.pid` is the container process itself, leader of its own session and process
group (`Proc.signal` reaches its children too).

Mount points that do not exist are never created on the machine: the nearest existing
ancestor (say /etc for /etc/driftless/tokens) gets an overlay whose upper layer is a private
tmpfs (mounted on that ancestor itself, under the overlay), the mount point is made there, and
the mounts the overlay hides (the netns hosts file) are bound back. Only paths inside the
pod's own volumes or an image rootfs are created as plain directories.

Process mode (no rootfs) and the interpreter: the project's Python lives under /root (mode
0700 here), which uid 10001 cannot traverse. Rather than change permissions on the machine,
the init puts a tmpfs (0755) over each such directory inside the private namespace and binds
back only the interpreter's prefix, the venv and the checkout. PATH starts with the venv's bin
dir and PYTHONPATH defaults to this checkout, so pods run the code of the tree under test.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal as _signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.cluster.net import Host

REPO_ROOT = str(Path(__file__).resolve().parents[2])
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POD_UID = 10001


@dataclass
class Mount:
    """`source` (a directory or file on the machine) appears at `path` inside the container."""

    path: str
    source: Path
    read_only: bool = False


@dataclass
class ContainerSpec:
    """What to run: argv with exactly `env` (plus PATH/PYTHONPATH defaults in process mode)."""

    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount] = field(default_factory=list)
    workdir: str | None = None
    uid: int = POD_UID
    gid: int = POD_UID
    rootfs: Path | None = None  # chroot into this image root filesystem
    log: Path | None = None  # stdout+stderr (appended); /dev/null when None


class Proc:
    """A launched container process (leader of its own process group)."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path | None) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.log = log

    def poll(self) -> int | None:
        """The exit code (negative signal number when killed), None while it runs."""
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit code; raises subprocess.TimeoutExpired after `timeout` seconds."""
        return self._popen.wait(timeout)

    def signal(self, sig: int) -> None:
        """Send `sig` (SIGKILL, SIGSTOP, SIGCONT, SIGTERM...) to the whole process group."""
        with contextlib.suppress(ProcessLookupError):  # already gone with its whole group
            os.killpg(self.pid, sig)

    def kill(self) -> int:
        """SIGKILL the group, resume it if stopped, and reap the leader."""
        self.signal(_signal.SIGKILL)
        self.signal(_signal.SIGCONT)
        return self.wait(10)


# ----------------------------------------------------------------------------- pure planning


Step = list[Any]  # ["bind", src, dst, ro] | ["overlay", dir] | ["mkdir", path] | ["touch", path]
#                   ["expose", hidden_dir, [paths]] | ["proc", path] | ["rbind", src, dst]


def nearest_existing(path: str, exists: Callable[[str], bool]) -> str:
    """The deepest ancestor of `path` (or `path` itself) that exists."""
    p = os.path.normpath(path)
    while not exists(p):
        p = os.path.dirname(p)
    return p


def untraversable_ancestor(path: str, can_enter: Callable[[str], bool]) -> str | None:
    """The topmost proper ancestor of `path` that the pod user cannot enter, or None."""
    parts = os.path.normpath(path).split("/")[1:]
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        if not can_enter(anc):
            return anc
    return None


def plan_exposures(paths: list[str], can_enter: Callable[[str], bool]) -> list[Step]:
    """Steps that make `paths` reachable for the pod user without touching the machine."""
    hidden: dict[str, list[str]] = {}
    for p in paths:
        anc = untraversable_ancestor(p, can_enter)
        if anc is not None and p not in hidden.setdefault(anc, []):
            hidden[anc].append(p)
    return [["expose", anc, sorted(ps)] for anc, ps in sorted(hidden.items())]


def plan_mounts(
    mounts: list[Mount],
    exists: Callable[[str], bool],
    is_dir: Callable[[str], bool],
    rootfs: str | None = None,
) -> list[Step]:
    """Mount steps, parents first. Missing mount points are made inside an overlay over their
    nearest existing ancestor (never on the machine), inside an earlier mount (the pod's own
    volume) or inside `rootfs` (the image's copy)."""
    steps: list[Step] = []
    overlaid: list[str] = []
    done: list[str] = []

    def inside(p: str, roots: list[str]) -> bool:
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    for m in sorted(mounts, key=lambda m: os.path.normpath(m.path).count("/")):
        dst = os.path.normpath((rootfs or "") + "/" + m.path.lstrip("/"))
        src = str(m.source)
        if not exists(dst):
            anc = nearest_existing(dst, exists)
            if rootfs is None and not inside(anc, done) and not inside(anc, overlaid):
                if anc == "/":
                    raise ValueError(f"mount point {m.path}: cannot overlay /")
                steps.append(["overlay", anc])
                overlaid.append(anc)
            parent = dst if is_dir(src) else os.path.dirname(dst)
            if not exists(parent):
                steps.append(["mkdir", parent])
            if not is_dir(src):
                steps.append(["touch", dst])
        steps.append(["bind", src, dst, m.read_only])
        done.append(dst)
    return steps


def plan_rebinds(keep: list[str], mount_paths: list[str]) -> list[Step]:
    """Kept paths (interpreter, venv, checkout) that a pod volume mounted at or above them would
    hide, bound back read-only at the same path inside that volume: a checkout under /tmp
    (where CI may clone it) vanished under the emptyDir every runtime pod mounts at /tmp."""
    def under(p: str, root: str) -> bool:
        return p == root or p.startswith(root.rstrip("/") + "/")

    roots = [os.path.normpath(m) for m in mount_paths]
    steps: list[Step] = []
    kept: list[str] = []
    for p in sorted({os.path.normpath(k) for k in keep}, key=len):
        if any(under(p, k) for k in kept) or not any(under(p, r) for r in roots):
            continue
        kept.append(p)
        steps += [["mkdir", p], ["bind", p, p, True]]
    return steps


def plan_rootfs(rootfs: str, netns: str, exists: Callable[[str], bool]) -> list[Step]:
    """What an image rootfs needs before chroot: /proc, /dev, /sys and the netns /etc files."""
    steps: list[Step] = [["mkdir", f"{rootfs}/{d}"] for d in ("proc", "dev", "sys", "etc")]
    steps += [["proc", f"{rootfs}/proc"], ["rbind", "/dev", f"{rootfs}/dev"]]
    steps.append(["rbind", "/sys", f"{rootfs}/sys"])
    for name in ("hosts", "resolv.conf"):
        src = f"/etc/netns/{netns}/{name}"
        if exists(src):
            dst = f"{rootfs}/etc/{name}"
            steps += [["touch", dst], ["bind", src, dst, True]]
    return steps


def container_env(spec: ContainerSpec) -> dict[str, str]:
    """The container's environment: the caller's `env`; in process mode PATH starts with the
    venv's bin dir and PYTHONPATH defaults to this checkout."""
    env = dict(spec.env)
    if spec.rootfs is None:
        venv_bin = os.path.dirname(sys.executable)
        path = env.get("PATH", DEFAULT_PATH)
        if venv_bin not in path.split(":"):
            env["PATH"] = f"{venv_bin}:{path}"
        env.setdefault("PYTHONPATH", REPO_ROOT)
    else:
        env.setdefault("PATH", DEFAULT_PATH)
    return env


def build_plan(spec: ContainerSpec, netns: str, facts: _Facts | None = None) -> dict[str, Any]:
    """The init's whole plan (JSON-able): mount steps, chroot, uid/gid, workdir, argv, env."""
    f = facts or _Facts(spec.uid, spec.gid)
    steps: list[Step] = []
    if spec.rootfs is None:
        keep = [os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), REPO_ROOT]
        steps += plan_exposures(keep, f.can_enter)
    else:
        steps += plan_rootfs(str(spec.rootfs), netns, f.exists)
    steps += plan_mounts(
        spec.mounts, f.exists, f.is_dir, str(spec.rootfs) if spec.rootfs else None
    )
    if spec.rootfs is None:
        steps += plan_rebinds(keep, [m.path for m in spec.mounts])
    return {
        "netns": netns,
        "steps": steps,
        "chroot": str(spec.rootfs) if spec.rootfs else None,
        "uid": spec.uid,
        "gid": spec.gid,
        "workdir": spec.workdir,
        "argv": spec.argv,
        "env": container_env(spec),
    }


def build_argv(netns: str, plan: dict[str, Any]) -> list[str]:
    """The command line that starts the init inside the Host's namespaces."""
    return [
        "ip", "netns", "exec", netns,
        "unshare", "--mount", "--propagation", "private", "--",
        sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(plan),
    ]  # fmt: skip


class _Facts:
    """The machine as the planner sees it (real file system, pod uid/gid)."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid

    def exists(self, p: str) -> bool:
        return os.path.lexists(p)

    def is_dir(self, p: str) -> bool:
        return os.path.isdir(p)

    def can_enter(self, p: str) -> bool:
        st = os.stat(p)
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid == self.gid:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)


def launch(host: Host, spec: ContainerSpec) -> Proc:
    """Start `spec` in `host` (see the module docstring); returns at once."""
    plan = build_plan(spec, host.netns)
    log = Path(os.devnull) if spec.log is None else spec.log
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            build_argv(host.netns, plan),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={"PATH": DEFAULT_PATH}, close_fds=True,
        )  # fmt: skip
    return Proc(popen, spec.log)


# ----------------------------------------------------------------------------- the init (root)

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    enc = [None if s is None else s.encode() for s in (src, dst, fstype, data)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} -> {dst} ({fstype}): {os.strerror(err)}")


def _bind(src: str, dst: str, ro: bool) -> None:
    _mount(src, dst, None, MS_BIND | MS_REC, None)
    if ro:
        _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)


def _submounts(top: str) -> list[str]:
    """Mount points strictly below `top`, outermost only (from /proc/self/mountinfo)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            p = line.split()[4].replace("\\040", " ")
            if p.startswith(top.rstrip("/") + "/"):
                points.append(p)
    return [p for p in points if not any(p.startswith(q + "/") for q in points)]


def _fd_path(p: str, flags: int = os.O_PATH | os.O_DIRECTORY) -> tuple[int, str]:
    fd = os.open(p, flags)
    return fd, f"/proc/self/fd/{fd}"


def _run_step(step: Step, sources: dict[str, int]) -> None:
    kind = step[0]
    if kind in ("bind", "rbind"):  # from the descriptor: an earlier mount may hide the path
        src = f"/proc/self/fd/{sources[step[1]]}" if step[1] in sources else step[1]
        _bind(src, step[2], kind == "bind" and bool(step[3]))
    elif kind == "mkdir":
        os.makedirs(step[1], exist_ok=True)
    elif kind == "touch":
        open(step[1], "a").close()
    elif kind == "proc":
        _mount("proc", step[1], "proc", 0, None)
    elif kind == "expose":  # tmpfs over a dir the pod cannot enter, then bind back `paths`
        hidden, paths = step[1], step[2]
        fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths}
        _mount("dlexpose", hidden, "tmpfs", 0, "mode=0755")
        for p, fd in fds.items():
            os.makedirs(p, exist_ok=True)
            _bind(f"/proc/self/fd/{fd}", p, True)
            os.close(fd)
    elif kind == "overlay":  # writable view of `dir` whose changes live in a private tmpfs
        # The upper layer is a tmpfs mounted on `top` itself, under the overlay: no directory
        # of the machine is needed; layers are passed as descriptors opened in between.
        top = step[1]
        subs = {p: os.open(p, os.O_PATH) for p in _submounts(top)}
        lower, lower_p = _fd_path(top)
        _mount("dlupper", top, "tmpfs", 0, "mode=0755")
        os.mkdir(f"{top}/.upper")
        os.mkdir(f"{top}/.work")
        upper, upper_p = _fd_path(f"{top}/.upper")
        work, work_p = _fd_path(f"{top}/.work")
        layers = f"lowerdir={lower_p},upperdir={upper_p},workdir={work_p}"
        _mount("dloverlay", top, "overlay", 0, layers)
        for fd in (lower, upper, work):
            os.close(fd)
        for p, fd in subs.items():  # the overlay hides mounts below `top` (e.g. /etc/hosts)
            _bind(f"/proc/self/fd/{fd}", p, False)
            os.close(fd)
    else:
        raise ValueError(f"unknown step {step!r}")


def _init(plan: dict[str, Any]) -> None:
    # open every source first: a mount at /tmp would hide a source under /tmp, say
    sources = {st[1]: os.open(st[1], os.O_PATH) for st in plan["steps"] if st[0] == "bind"}
    for step in plan["steps"]:
        _run_step(step, sources)
    for fd in sources.values():
        os.close(fd)
    if plan["chroot"]:
        os.chroot(plan["chroot"])
        os.chdir("/")
    os.setgroups([])
    os.setgid(plan["gid"])
    os.setuid(plan["uid"])
    if plan["workdir"]:
        os.chdir(plan["workdir"])
    env = plan["env"]
    argv = plan["argv"]
    # exec through PATH as the container sees it (the venv's bin first in process mode)
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    try:
        _init(json.loads(sys.argv[1]))
    except BaseException as exc:  # the log is the only place anyone will look
        print(f"driftless-launch: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)
