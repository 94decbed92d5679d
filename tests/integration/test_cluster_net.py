"""tests/cluster/net.py and launch.py on real namespaces: two Hosts, an HTTP server as uid
10001 in one, reached by name from the other; mounts at container paths (read-only where
asked, missing mount points made without touching the machine); cut/heal, link down/up,
SIGSTOP/SIGCONT, a ServiceProxy on an alias; close() and sweep() leave nothing behind.
Needs root, iproute2 and util-linux's unshare (skips otherwise)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cluster.net import NETNS_ETC, STATE_DIR, ContainerSpec, Host, Mount, Network, launch
from tests.cluster.proxy import ServiceProxy

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"),
    reason="needs root, `ip` (iproute2) and `unshare` (util-linux) for network namespaces",
)

PORT = 8080
SERVER = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = "/etc/hosts" if self.path == "/etc-hosts" else sys.argv[1] + self.path
        body = open(path).read().encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", PORT), H).serve_forever()
""".replace("PORT", str(PORT))
CLIENT = """
import sys, urllib.request
try:
    print("OK", urllib.request.urlopen(sys.argv[1], timeout=1).read().decode())
except Exception as e:
    print("FAIL", type(e).__name__, e)
"""

WRITE = """
import sys
for p in sys.argv[1:]:
    try:
        open(p, "w").write("x"); print("wrote", p)
    except OSError as e:
        print("denied", p, e.errno)
"""


def proc_state(pid: int) -> str:
    """R, S, T (stopped)... from /proc/<pid>/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]


def until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pod_dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    os.chown(d, 10001, 10001)
    return d


def run_in(host: Host, root: Path, argv: list[str], mounts: list[Mount] | None = None) -> str:
    """Run a short command as uid 10001 in `host`; its output."""
    log = root / f"run-{time.monotonic_ns()}.log"
    tmp = pod_dir(root, "clienttmp")
    env = {"HOME": "/tmp", "TMPDIR": "/tmp"}
    spec = ContainerSpec(argv, env, [Mount("/tmp", tmp), *(mounts or [])], log=log)
    assert launch(host, spec).wait(30) is not None
    return log.read_text()


def fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return "OK " + bytes(r.read()).decode()
    except Exception as e:  # any failure: refused, timeout, reset
        return f"FAIL {type(e).__name__}"


@pytest.fixture
def root() -> Iterator[Path]:
    # not pytest's tmp_path: /tmp/pytest-of-root is 0700; sources are bound in by root anyway,
    # but the assertions read files the pods wrote
    d = Path(f"/tmp/dl-net-test-{os.getpid()}")
    d.mkdir(exist_ok=True)
    yield d
    # mounts live in the pods' private namespaces; if one ever leaked, never delete through it
    mounted = [p for p, _, _ in os.walk(d) if os.path.ismount(p)]
    assert mounted == [], f"mounts leaked to the machine: {mounted}"
    shutil.rmtree(d, ignore_errors=True)


def leftovers(net: Network) -> list[str]:
    names = [h.netns for h in net.hosts.values()] or []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout)
    ours = [x["ifname"] for x in links if x["ifname"].startswith(f"{net.prefix}{net.k}")]
    etc = [p for p in names if os.path.exists(f"{NETNS_ETC}/{p}")]
    return ours + [n for n in names if n in ns.split()] + etc


@needs_netns
def test_two_hosts_names_mounts_faults_and_cleanup(root: Path) -> None:
    web = root / "web"
    web.mkdir()
    (web / "hello.txt").write_text("hello from a")
    state = pod_dir(root, "state")
    net = Network(prefix="dlt")
    hosts: list[str] = []
    try:
        a, b = net.add_host("a"), net.add_host("b")
        hosts = [a.netns, b.netns]
        net.set_names({"web": [a.ip], "web.ns.svc": [a.ip]})
        mounts = [
            Mount("/etc/driftless/web", web, read_only=True),  # /etc/driftless does not exist
            Mount("/var/lib/driftless/state", state),
            Mount("/tmp", pod_dir(root, "atmp")),
        ]
        env = {"HOME": "/tmp", "TMPDIR": "/tmp"}
        argv = ["python", "-c", SERVER, "/etc/driftless/web"]
        server = launch(a, ContainerSpec(argv, env, mounts, log=root / "a.log"))
        until(lambda: fetch(f"http://{a.ip}:{PORT}/hello.txt").startswith("OK"), "the server in a")
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert "Uid:\t10001\t10001\t10001\t10001" in status and "Gid:\t10001\t10001" in status
        assert not os.path.exists("/etc/driftless") and not os.path.exists("/var/lib/driftless")

        # by name from the other host, as uid 10001 too
        out = run_in(b, root, ["python", "-c", CLIENT, f"http://web.ns.svc:{PORT}/hello.txt"])
        assert out.startswith("OK hello from a"), out

        # read-only where asked, writable elsewhere; same mounts in a second container
        out = run_in(a, root, ["python", "-c", WRITE, "/etc/driftless/web/new",
                               "/var/lib/driftless/state/new"], mounts[:2])  # fmt: skip
        assert "denied /etc/driftless/web/new 30" in out, out  # EROFS
        assert (state / "new").read_text() == "x" and (state / "new").stat().st_uid == 10001
        assert not (web / "new").exists()

        # cut b -> a, then heal
        url_b = ["python", "-c", CLIENT, f"http://web:{PORT}/hello.txt"]
        net.cut(b, a.ip)
        assert run_in(b, root, url_b).startswith("FAIL"), "cut"
        assert fetch(f"http://{a.ip}:{PORT}/hello.txt").startswith("OK")  # only b is cut
        net.heal(b, a.ip)
        assert run_in(b, root, url_b).startswith("OK")

        # link down partitions a from everyone, up heals
        net.link(a, False)
        assert fetch(f"http://{a.ip}:{PORT}/hello.txt") == "FAIL URLError"
        net.link(a, True)
        until(lambda: fetch(f"http://{a.ip}:{PORT}/hello.txt").startswith("OK"), "link up")

        # SIGSTOP: the process group stops answering; SIGCONT: it answers again
        server.signal(signal.SIGSTOP)
        until(lambda: proc_state(server.pid) == "T", "stopped")
        assert fetch(f"http://{a.ip}:{PORT}/hello.txt").startswith("FAIL")
        server.signal(signal.SIGCONT)
        until(lambda: fetch(f"http://{a.ip}:{PORT}/hello.txt").startswith("OK"), "continued")

        # a Service: a proxy on an alias of the machine, by name from b
        vip = net.alias()
        with ServiceProxy(vip, 80) as proxy:
            net.set_names({"web": [vip]})
            # rewritten in place: a process started before sees the new text in its /etc/hosts
            assert f"{vip}\tweb\n" in fetch(f"http://{a.ip}:{PORT}/etc-hosts")
            proxy.set_endpoints([(a.ip, PORT)])
            via_proxy = ["python", "-c", CLIENT, "http://web/hello.txt"]
            assert run_in(b, root, via_proxy).startswith("OK hello")
            proxy.set_endpoints([])
            assert run_in(b, root, via_proxy).startswith("FAIL")
        assert server.poll() is None
    finally:
        net.close()
    assert server.wait(5) is not None  # close() killed what ran in the namespaces
    assert leftovers(net) == []
    for ns in hosts:
        assert not os.path.exists(f"/run/netns/{ns}") and not os.path.exists(f"{NETNS_ETC}/{ns}")
    assert not os.path.exists(f"{STATE_DIR}/{net.bridge}.json")


@needs_netns
def test_image_rootfs_mode_chroots_with_the_hosts_file_proc_and_mounts(root: Path) -> None:
    """A stand-in image: an empty rootfs that gets the machine's /usr read-only (Debian's
    python3 lives there), /bin etc. as the usual symlinks."""
    rootfs = root / "rootfs"
    rootfs.mkdir()
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.isdir(f"/usr/{link}"):
            (rootfs / link).symlink_to(f"usr/{link}")
    data = pod_dir(root, "data")
    (data / "in.txt").write_text("mounted")
    probe = (
        "import os\n"
        "print(os.getuid(), os.getgid(), os.path.exists('/work'), os.getcwd())\n"
        "print(open('/etc/driftless/data/in.txt').read(), open('/etc/hosts').read().split()[-1])\n"
        "print(os.readlink('/proc/self') == str(os.getpid()))"
    )
    with Network(prefix="dlt") as net:
        host = net.add_host("img")
        net.set_names({"s3.example": [net.gateway]})
        mounts = [Mount("/usr", Path("/usr"), read_only=True), Mount("/etc/driftless/data", data)]
        log = root / "img.log"
        spec = ContainerSpec(["python3", "-c", probe], {}, mounts, workdir="/etc", rootfs=rootfs,
                             log=log)  # fmt: skip
        assert launch(host, spec).wait(30) == 0, log.read_text()
    uid_line, data_line, proc_line = log.read_text().splitlines()
    assert uid_line == "10001 10001 False /etc"  # chrooted: the machine's /work is not there
    assert data_line == "mounted s3.example"
    assert proc_line == "True"


@needs_netns
def test_sweep_removes_a_crashed_runs_leftovers() -> None:
    crash = (
        "import os\nfrom tests.cluster.net import Network\n"
        "net = Network(prefix='dlsw'); net.add_host('x'); print(net.k, flush=True)\n"
        "os.kill(os.getpid(), 9)"  # no atexit, no close(): a crashed run
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run(
        [sys.executable, "-c", crash], capture_output=True, text=True, env=env, timeout=30
    )
    k = int(r.stdout.split()[0])
    assert os.path.exists(f"/run/netns/dlsw{k}-x")
    Network.sweep(prefix="dlsw", older_than_s=3600)  # young, but its owner is dead
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert f"dlsw{k}br" not in links and f"dlsw{k}v1" not in links
    assert not os.path.exists(f"/run/netns/dlsw{k}-x")
    assert not os.path.exists(f"{NETNS_ETC}/dlsw{k}-x")
    assert not os.path.exists(f"{STATE_DIR}/dlsw{k}br.json")


@needs_netns
def test_concurrent_runs_and_threads_get_distinct_subnets_and_addresses() -> None:
    """Three processes at once get three /24s (the flock); hosts added from threads at once
    (as the kubelet does) get distinct addresses and are all plumbed."""
    code = (  # each run imports, says ready, then all allocate at the same moment
        "import sys\nfrom tests.cluster.net import Network\nprint('ready', flush=True)\n"
        "sys.stdin.readline(); net = Network(prefix='dlp'); print(net.k, flush=True)\n"
        "sys.stdin.read(); net.close()"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [sys.executable, "-c", code]
    pipe = subprocess.PIPE
    runs = [subprocess.Popen(argv, text=True, env=env, stdin=pipe, stdout=pipe) for _ in "abc"]
    try:
        pipes = [(r.stdin, r.stdout) for r in runs if r.stdin and r.stdout]
        assert [o.readline() for _, o in pipes] == ["ready\n"] * 3
        for i, _ in pipes:
            i.write("go\n")
            i.flush()
        ks = [o.readline().strip() for _, o in pipes]  # without the flock: "File exists"
    finally:
        for r in runs:
            r.communicate("", timeout=30)
    assert all(k.isdigit() for k in ks) and len(set(ks)) == 3, ks

    with Network(prefix="dlt") as net, ThreadPoolExecutor(6) as pool:
        hosts = list(pool.map(net.add_host, [f"h{i}" for i in range(12)]))
        assert len({h.ip for h in hosts}) == 12 and len({h.veth for h in hosts}) == 12

        def reachable(h: Host) -> bool:  # nothing listens: a reset, not a timeout, proves a path
            try:
                socket.create_connection((h.ip, 9), timeout=2).close()
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
            return True

        assert all(pool.map(reachable, hosts))


def test_service_proxy_round_robin_skip_dead_and_reset() -> None:
    """No namespaces needed: two servers on 127.0.0.1 that answer their name, one proxy."""
    servers = [(socket.create_server(("127.0.0.1", 0)), name) for name in (b"one", b"two")]

    def serve(s: socket.socket, name: bytes) -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.sendall(name)
            c.close()

    for s, name in servers:
        threading.Thread(target=serve, args=(s, name), daemon=True).start()
    with ServiceProxy("127.0.0.1", _free_port()) as proxy:

        def ask() -> bytes:
            with socket.create_connection((proxy.ip, proxy.port), timeout=2) as c:
                return c.recv(100)

        with pytest.raises(ConnectionResetError):  # no endpoints yet
            ask()
        proxy.set_endpoints([s.getsockname() for s, _ in servers])
        assert [ask() for _ in range(4)] in ([b"one", b"two"] * 2, [b"two", b"one"] * 2)
        dead = ("127.0.0.1", _free_port())  # nothing listens there: the next endpoint answers
        proxy.set_endpoints([dead, servers[1][0].getsockname()])
        assert [ask() for _ in range(3)] == [b"two"] * 3
        proxy.set_endpoints([])
        with pytest.raises(ConnectionResetError):
            ask()
    for s, _ in servers:
        s.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_proxy_that_binds_after_the_kubelet_stopped_closes_itself() -> None:
    """The race the kubelet's stop() meets: a tick's worker thread still binding a Service's
    proxy. Registered before stop() takes the proxies, stop() closes it; bound after, it
    closes itself. Either way the address is free again (a proxy left open kept a Service's
    address bound into the next cluster of the same test process)."""
    from tests.cluster.kubelet_services import ServiceControllers

    class Controllers(ServiceControllers):
        def __init__(self) -> None:
            self._proxies = {}
            self._proxy_lock = threading.Lock()
            self._stopped = False

    def rebind(port: int) -> None:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))

    kubelet = Controllers()
    port = _free_port()
    proxy = kubelet._open_proxy(("ns", "svc", port), "127.0.0.1", port)
    assert proxy is not None and kubelet._proxies == {("ns", "svc", port): proxy}
    proxy.close()
    kubelet._stopped = True
    port = _free_port()
    assert kubelet._open_proxy(("ns", "svc", port), "127.0.0.1", port) is None
    assert ("ns", "svc", port) not in kubelet._proxies
    rebind(port)  # closed: the address is free
