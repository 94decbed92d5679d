"""Test hosts with their own addresses: a bridge, one network namespace + veth per Host.

One `Network` per cluster run. It claims a free /24 in 10.251.0.0/16 under an flock
(/run/driftless-net.lock): the lowest k whose 10.251.k.0/24 is on no interface, then creates
bridge "<prefix><k>br" with the gateway 10.251.k.1 before releasing the lock, so concurrent
runs never pick the same k. Each Host is netns "<prefix><k>-<name>" with "eth0" (its veth peer
on the bridge), lo up, a default route via the gateway, and /etc/netns/<ns>/{hosts,resolv.conf}
(`ip netns exec` mounts them over /etc). The resolver points at 127.0.0.1 so a name missing
from the hosts file fails at once instead of waiting on a DNS server nobody can reach.

Faults: `cut` adds a blackhole route to one peer inside the Host (connects fail, packets to it
are dropped), `link(host, False)` downs the bridge-side veth (the whole Host is partitioned).

Cleanup: `close()` (also registered with atexit) kills what still runs in the namespaces,
deletes veths, namespaces, the bridge and the /etc/netns dirs, each step on its own so one
failure does not leave the rest. `Network.sweep()` removes leftovers of crashed runs: groups
whose owner process is gone, or older than `older_than_s` (a state file
/run/driftless-net/<bridge>.json records owner pid and creation time).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from tests.cluster.launch import ContainerSpec, Mount, Proc, launch
from tests.cluster.proxy import ServiceProxy

__all__ = ["ContainerSpec", "Host", "Mount", "Network", "Proc", "ServiceProxy", "launch"]

SUPERNET = ipaddress.ip_network("10.251.0.0/16")
LOCK_FILE = "/run/driftless-net.lock"
STATE_DIR = "/run/driftless-net"
NETNS_ETC = "/etc/netns"
LOCALHOST_LINES = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


@dataclass
class Host:
    """A network namespace with one address on the run's bridge."""

    name: str
    netns: str
    ip: str
    veth: str = ""  # the bridge-side end of its veth pair


# ----------------------------------------------------------------------------- pure parts


def pick_subnet(used: set[int]) -> int:
    """The lowest k in 1..254 whose 10.251.k.0/24 is not in `used`."""
    for k in range(1, 255):
        if k not in used:
            return k
    raise RuntimeError("no free /24 in 10.251.0.0/16")


def used_subnets(addresses: list[str]) -> set[int]:
    """Third octets of the addresses inside 10.251.0.0/16 ("a.b.c.d" or "a.b.c.d/len")."""
    out = set()
    for a in addresses:
        ip = ipaddress.ip_address(a.split("/")[0])
        if ip in SUPERNET:
            out.add(int(str(ip).split(".")[2]))
    return out


def bridge_ks(prefix: str, link_names: list[str]) -> set[int]:
    """k of every "<prefix><k>br" link (a crashed run's bridge may have lost its address)."""
    pat = re.compile(rf"{re.escape(prefix)}(\d+)br")
    return {int(m.group(1)) for n in link_names if (m := pat.fullmatch(n))}


def next_octet(used: set[int], start: int = 2) -> int:
    """The first free last octet from `start` on, wrapping around (1 is the gateway, 255
    broadcast). Network passes the octet after its last one: a just-freed address is not
    handed out again at once, since peers still cache the old host's MAC for it (ARP, ~30 s)
    and would send a recreated pod's packets nowhere (found by the kubelet's test)."""
    span = list(range(2, 255))
    first = span.index(start) if start in span else 0
    for i in span[first:] + span[:first]:
        if i not in used:
            return i
    raise RuntimeError("subnet full")


def hosts_text(names: dict[str, list[str]]) -> str:
    """/etc/hosts content: localhost lines, then one line per IP with its names (sorted, so
    the text is stable). A name with several IPs (a headless Service) appears on each line."""
    by_ip: dict[str, list[str]] = {}
    for name, ips in names.items():
        for ip in ips:
            by_ip.setdefault(ip, []).append(name)
    lines = [
        f"{ip}\t{' '.join(sorted(ns))}\n"
        for ip, ns in sorted(by_ip.items(), key=lambda kv: ipaddress.ip_address(kv[0]))
    ]
    return LOCALHOST_LINES + "".join(lines)


def netns_name(prefix: str, k: int, host: str) -> str:
    """The netns for `host`: "<prefix><k>-<host>" (host names: [a-z0-9-], as Pod names)."""
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", host):
        raise ValueError(f"bad host name {host!r}")
    return f"{prefix}{k}-{host}"


def veth_name(prefix: str, k: int, i: int) -> str:
    """Bridge-side veth "<prefix><k>v<i>"; at most 15 characters (IFNAMSIZ - 1)."""
    name = f"{prefix}{k}v{i}"
    if len(name) > 15:
        raise ValueError(f"interface name too long: {name}")
    return name


def is_stale(state: dict[str, float], now: float, older_than_s: float, alive: bool) -> bool:
    """A run's leftovers may be swept when its owner is gone or it is older than the limit."""
    created = state.get("created")
    return not alive or created is None or now - created >= older_than_s


# ----------------------------------------------------------------------------- edges


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _links() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(_ip("-j", "addr", "show").stdout or "[]")
    return data


def _used_ks(prefix: str) -> set[int]:
    links = _links()
    addrs = [a["local"] for link in links for a in link.get("addr_info", []) if "local" in a]
    return used_subnets(addrs) | bridge_ks(prefix, [link.get("ifname", "") for link in links])


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would reach whole groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_in_place(path: str, text: str) -> None:
    """Rewrite `path` keeping its inode: the bind mounts of running `ip netns exec` processes
    point at the inode, so a rename would leave them on the old file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        data = text.encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


class Network:
    """One run's bridge + hosts (see the module docstring). Context manager."""

    def __init__(self, prefix: str = "dl") -> None:
        if not re.fullmatch(r"[a-z]{1,4}", prefix):
            raise ValueError("prefix: 1-4 lowercase letters (interface names are short)")
        self.prefix = prefix
        self.hosts: dict[str, Host] = {}
        self.aliases: list[str] = []
        self._names: dict[str, list[str]] = {}
        self._octets: set[int] = {1}
        self._last_octet = 1
        self._veths = 0
        self._closed = False
        self._bridge_made = False
        # the kubelet calls add_host/remove_host/set_names from worker threads at once
        self._lock = threading.RLock()
        os.makedirs(STATE_DIR, exist_ok=True)
        with open(LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.k = pick_subnet(_used_ks(prefix))
            self.bridge = f"{prefix}{self.k}br"
            self.subnet = f"10.251.{self.k}.0/24"
            self.gateway = f"10.251.{self.k}.1"
            self._write_state()
            atexit.register(self.close)
            try:
                _ip("link", "add", self.bridge, "type", "bridge")
                self._bridge_made = True  # only then is the name ours to delete
                _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            except BaseException:
                self.close()
                raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "created": time.time(), "prefix": self.prefix, "k": self.k}
        with open(f"{STATE_DIR}/{self.bridge}.json", "w") as f:
            json.dump(state, f)

    def _ip_for(self) -> str:
        octet = next_octet(self._octets, self._last_octet + 1)
        self._octets.add(octet)
        self._last_octet = octet
        return f"10.251.{self.k}.{octet}"

    def add_host(self, name: str) -> Host:
        """A new namespace with its own address, reachable from the gateway and every Host.
        On failure nothing of it is left (the same name can be added again)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("network closed")
            if name in self.hosts:
                raise ValueError(f"host {name} exists")
            ns = netns_name(self.prefix, self.k, name)
            self._veths += 1
            host = Host(name, ns, self._ip_for(), veth_name(self.prefix, self.k, self._veths))
            self.hosts[name] = host  # registered first: close() cleans a half-made host too
            os.makedirs(f"{NETNS_ETC}/{ns}", exist_ok=True)
            _write_in_place(f"{NETNS_ETC}/{ns}/hosts", hosts_text(self._names))
        try:
            self._plumb(host)
        except BaseException:
            self.remove_host(host)
            raise
        return host

    def _plumb(self, host: Host) -> None:
        ns = host.netns
        _write_in_place(f"{NETNS_ETC}/{ns}/resolv.conf", RESOLV_CONF)
        _ip("netns", "add", ns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        _ip("-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", self.gateway)

    def remove_host(self, host: Host) -> None:
        """Kill what runs in the Host and remove its namespace, veth and /etc/netns dir."""
        with self._lock:
            if self.hosts.get(host.name) is host:
                del self.hosts[host.name]
        _remove_netns(host.netns, host.veth)
        with self._lock:  # the address is free only once nothing uses it
            self._octets.discard(int(host.ip.rsplit(".", 1)[1]))

    def alias(self) -> str:
        """One more address of the machine on the bridge (for a Service proxy, the API...)."""
        with self._lock:
            ip = self._ip_for()
            self.aliases.append(ip)
        _ip("addr", "add", f"{ip}/32", "dev", self.bridge)
        return ip

    def set_names(self, names: dict[str, list[str]]) -> None:
        """Every Host's hosts file becomes localhost + `names` (rewritten in place)."""
        with self._lock:  # a host being added gets either this text or a later one
            self._names = {n: list(ips) for n, ips in names.items()}
            text = hosts_text(self._names)
            for host in list(self.hosts.values()):
                with contextlib.suppress(FileNotFoundError):  # a host being removed
                    _write_in_place(f"{NETNS_ETC}/{host.netns}/hosts", text)

    def cut(self, host: Host, peer_ip: str) -> None:
        """Packets from `host` to `peer_ip` are dropped (connects fail) until `heal`."""
        _ip("-n", host.netns, "route", "replace", "blackhole", f"{peer_ip}/32")

    def heal(self, host: Host, peer_ip: str) -> None:
        """Undo `cut` (a no-op when there is no cut)."""
        _ip("-n", host.netns, "route", "del", "blackhole", f"{peer_ip}/32", check=False)

    def link(self, host: Host, up: bool) -> None:
        """Bridge-side veth of `host` up or down: down partitions the whole Host."""
        _ip("link", "set", host.veth, "up" if up else "down")

    def close(self) -> None:
        """Remove every Host, alias and the bridge; safe to call twice and after failures."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        for host in list(self.hosts.values()):
            with contextlib.suppress(Exception):  # keep going: the rest must still go
                self.remove_host(host)
        if self._bridge_made:
            _ip("link", "del", self.bridge, check=False)
        _unlink(f"{STATE_DIR}/{self.bridge}.json")

    @staticmethod
    def sweep(prefix: str = "dl", older_than_s: float = 3600) -> None:
        """Remove namespaces, bridges and /etc/netns dirs of crashed runs with this prefix:
        runs whose owner pid is dead, or older than `older_than_s` seconds. Holds the
        allocation lock, so a run being created (state file first) is never swept."""
        os.makedirs(STATE_DIR, exist_ok=True)
        with open(LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _sweep_locked(prefix, older_than_s)


def _sweep_locked(prefix: str, older_than_s: float) -> None:
    """The sweep itself (the caller holds LOCK_FILE)."""
    now = time.time()
    stale: set[int] = set()
    live: set[int] = set()
    pat = re.compile(rf"{re.escape(prefix)}(\d+)br\.json")
    for f in os.listdir(STATE_DIR) if os.path.isdir(STATE_DIR) else []:
        m = pat.fullmatch(f)
        if not m:
            continue
        try:
            with open(f"{STATE_DIR}/{f}") as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            state = {}
        alive = _pid_alive(int(state.get("pid", 0)))
        (stale if is_stale(state, now, older_than_s, alive) else live).add(int(m.group(1)))
    ns_pat = re.compile(rf"{re.escape(prefix)}(\d+)-[a-z0-9.-]+")
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    etc = set(os.listdir(NETNS_ETC)) if os.path.isdir(NETNS_ETC) else set()
    for ns in netns | etc:
        m = ns_pat.fullmatch(ns)
        if not m or int(m.group(1)) in live:
            continue
        k = int(m.group(1))
        if k in stale or _age(f"/run/netns/{ns}", f"{NETNS_ETC}/{ns}") >= older_than_s:
            _remove_netns(ns, "")
    br_pat = re.compile(rf"{re.escape(prefix)}(\d+)(br|v\d+)")
    for link in json.loads(_ip("-j", "link", "show").stdout or "[]"):
        m = br_pat.fullmatch(link.get("ifname", ""))
        # a bridge is created after its state file and deleted before it: no file, no owner
        if m and (int(m.group(1)) in stale or int(m.group(1)) not in live):
            _ip("link", "del", link["ifname"], check=False)
    for k in stale:
        _unlink(f"{STATE_DIR}/{prefix}{k}br.json")


def _age(*paths: str) -> float:
    now = time.time()
    for p in paths:
        try:
            return now - os.stat(p).st_mtime
        except OSError:
            continue
    return float("inf")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_netns(ns: str, veth: str) -> None:
    """Kill the namespace's processes, delete veth + netns + /etc/netns/<ns> (best effort)."""
    r = _ip("netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    if veth:
        _ip("link", "del", veth, check=False)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(f"{NETNS_ETC}/{ns}", ignore_errors=True)
    with contextlib.suppress(OSError):  # only when empty: other runs' dirs stay
        os.rmdir(NETNS_ETC)


if __name__ == "__main__":  # `python -m tests.cluster.net [prefix] [older_than_s]`: sweep by hand
    import sys

    Network.sweep(sys.argv[1] if len(sys.argv) > 1 else "dl",
                  float(sys.argv[2]) if len(sys.argv) > 2 else 3600)  # fmt: skip
