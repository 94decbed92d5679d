"""The pure parts of tests/cluster/net.py, launch.py and proxy.py: address allocation, hosts
file text, names, sweep decisions, the container's mount plan, environment and argv."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.cluster.launch import (
    REPO_ROOT,
    ContainerSpec,
    Mount,
    build_argv,
    build_plan,
    container_env,
    plan_exposures,
    plan_mounts,
    plan_rebinds,
    plan_rootfs,
    untraversable_ancestor,
)
from tests.cluster.net import (
    bridge_ks,
    hosts_text,
    is_stale,
    netns_name,
    next_octet,
    pick_subnet,
    used_subnets,
    veth_name,
)
from tests.cluster.proxy import rotate

# ------------------------------------------------------------------ addresses and names


def test_subnet_is_the_lowest_third_octet_on_no_interface() -> None:
    used = used_subnets(["127.0.0.1", "10.251.1.1/24", "10.251.3.9", "10.250.2.1", "fd00::2"])
    assert used == {1, 3}
    assert pick_subnet(used) == 2
    assert pick_subnet(set()) == 1
    with pytest.raises(RuntimeError):
        pick_subnet(set(range(1, 255)))


def test_a_bridge_left_without_its_address_still_counts_as_taken() -> None:
    names = ["lo", "dl3br", "dl12br", "dl3v1", "dlt4br", "xdl5br", "dl7brx"]
    assert bridge_ks("dl", names) == {3, 12}
    assert bridge_ks("dlt", names) == {4}


def test_host_octets_skip_the_gateway_and_reuse_freed_ones() -> None:
    assert next_octet({1}) == 2
    assert next_octet({1, 2, 3, 5}) == 4
    assert next_octet({1, 2, 3, 5}, start=5) == 6  # a freed address is not reused at once
    assert next_octet(set(range(1, 254)), start=254) == 254 and next_octet({1, 254}, start=254) == 2
    with pytest.raises(RuntimeError):
        next_octet(set(range(1, 255)))


def test_hosts_text_groups_names_by_ip_and_repeats_multi_ip_names() -> None:
    text = hosts_text({"web": ["10.251.1.10", "10.251.1.9"], "api": ["10.251.1.9"]})
    lines = text.splitlines()
    assert lines[0] == "127.0.0.1\tlocalhost"
    assert lines[1].startswith("::1\tlocalhost")
    # numeric order (.9 before .10), names sorted on a line
    assert lines[2:] == ["10.251.1.9\tapi web", "10.251.1.10\tweb"]
    assert hosts_text({}) == "\n".join(lines[:2]) + "\n"


def test_names_fit_the_kernel_and_reject_what_ip_netns_would_choke_on() -> None:
    assert netns_name("dl", 7, "writer-0") == "dl7-writer-0"
    for bad in ("Writer", "a/b", "-x", "", "a b"):
        with pytest.raises(ValueError):
            netns_name("dl", 7, bad)
    assert veth_name("dl", 254, 999) == "dl254v999"
    with pytest.raises(ValueError):
        veth_name("dlxx", 254, 99999999)  # 16 characters > IFNAMSIZ - 1


def test_sweep_takes_dead_owners_at_any_age_and_live_ones_only_when_old() -> None:
    state = {"created": 1000.0, "pid": 42.0}
    assert is_stale(state, 1001.0, 3600, alive=False)
    assert not is_stale(state, 1001.0, 3600, alive=True)
    assert is_stale(state, 1000.0 + 3600, 3600, alive=True)
    assert is_stale({}, 1001.0, 3600, alive=True)  # unreadable state: created unknown


def test_round_robin_order_starts_at_the_cursor_and_tries_each_endpoint_once() -> None:
    eps = [("a", 1), ("b", 1), ("c", 1)]
    assert rotate(eps, 0) == eps
    assert rotate(eps, 4) == [("b", 1), ("c", 1), ("a", 1)]
    assert rotate([], 3) == []


# ------------------------------------------------------------------ mounts


class FakeFS:
    """A file system of existing paths; directories unless listed in `files`."""

    def __init__(self, paths: list[str], files: tuple[str, ...] = ()) -> None:
        self.paths = set(paths) | {"/"}
        self.files = set(files)

    def exists(self, p: str) -> bool:
        return p in self.paths

    def is_dir(self, p: str) -> bool:
        return p not in self.files


FS = FakeFS(["/etc", "/var", "/var/lib", "/tmp", "/src", "/src/tok", "/src/tmp", "/src/f"],
            files=("/src/f",))  # fmt: skip


def test_a_missing_mount_point_goes_into_an_overlay_of_its_nearest_existing_ancestor() -> None:
    steps = plan_mounts([Mount("/etc/driftless/tokens", Path("/src/tok"), True)],
                        FS.exists, FS.is_dir)  # fmt: skip
    assert steps == [
        ["overlay", "/etc"],
        ["mkdir", "/etc/driftless/tokens"],
        ["bind", "/src/tok", "/etc/driftless/tokens", True],
    ]


def test_existing_mount_points_need_no_overlay_and_one_overlay_serves_siblings() -> None:
    mounts = [
        Mount("/var/lib/driftless/wal", Path("/src/tok")),
        Mount("/tmp", Path("/src/tmp")),
        Mount("/var/lib/driftless/x", Path("/src/tok")),
    ]
    steps = plan_mounts(mounts, FS.exists, FS.is_dir)
    assert steps[0] == ["bind", "/src/tmp", "/tmp", False]  # parents (shallow paths) first
    assert [s for s in steps if s[0] == "overlay"] == [["overlay", "/var/lib"]]
    assert ["mkdir", "/var/lib/driftless/x"] in steps


def test_a_mount_point_inside_an_earlier_mount_is_made_in_the_pods_own_volume() -> None:
    mounts = [Mount("/tmp/cache/models", Path("/src/tok")), Mount("/tmp", Path("/src/tmp"))]
    steps = plan_mounts(mounts, FS.exists, FS.is_dir)
    assert steps == [
        ["bind", "/src/tmp", "/tmp", False],
        ["mkdir", "/tmp/cache/models"],
        ["bind", "/src/tok", "/tmp/cache/models", False],
    ]


def test_a_file_source_gets_a_file_mount_point() -> None:
    steps = plan_mounts([Mount("/etc/driftless/conf.yaml", Path("/src/f"))], FS.exists, FS.is_dir)
    assert steps == [
        ["overlay", "/etc"],
        ["mkdir", "/etc/driftless"],
        ["touch", "/etc/driftless/conf.yaml"],
        ["bind", "/src/f", "/etc/driftless/conf.yaml", False],
    ]


def test_a_missing_top_level_dir_is_refused_rather_than_overlaying_root() -> None:
    with pytest.raises(ValueError, match="overlay /"):
        plan_mounts([Mount("/data", Path("/src/tok"))], FS.exists, FS.is_dir)


def test_in_an_image_rootfs_mount_points_are_made_in_the_image_copy() -> None:
    fs = FakeFS([*FS.paths, "/img", "/img/etc"])
    steps = plan_mounts([Mount("/etc/driftless/tokens", Path("/src/tok"), True)],
                        fs.exists, fs.is_dir, rootfs="/img")  # fmt: skip
    assert steps == [
        ["mkdir", "/img/etc/driftless/tokens"],
        ["bind", "/src/tok", "/img/etc/driftless/tokens", True],
    ]
    pre = plan_rootfs("/img", "dl1-a", FakeFS(["/etc/netns/dl1-a/hosts"]).exists)
    assert ["bind", "/etc/netns/dl1-a/hosts", "/img/etc/hosts", True] in pre
    assert ["proc", "/img/proc"] in pre
    assert not any("resolv.conf" in str(s) for s in pre)  # only the files that exist


def test_dirs_the_pod_user_cannot_enter_are_replaced_by_a_view_of_only_what_it_needs() -> None:
    closed = {"/root"}

    def enter(p: str) -> bool:
        return p not in closed

    assert untraversable_ancestor("/root/.pyenv/versions/3.11.7", enter) == "/root"
    assert untraversable_ancestor("/work/main/.venv", enter) is None
    assert untraversable_ancestor("/root", enter) is None  # the path itself is not entered
    steps = plan_exposures(
        ["/root/.pyenv/versions/3.11.7", "/work/main/.venv", "/root/.pyenv/versions/3.11.7"],
        enter,
    )
    assert steps == [["expose", "/root", ["/root/.pyenv/versions/3.11.7"]]]


# ------------------------------------------------------------------ env and argv


def test_process_mode_env_puts_the_venv_first_and_defaults_pythonpath_to_the_checkout() -> None:
    venv_bin = os.path.dirname(sys.executable)
    env = container_env(ContainerSpec(["x"], {"HOME": "/tmp", "PATH": "/usr/bin"}))
    assert env == {"HOME": "/tmp", "PATH": f"{venv_bin}:/usr/bin", "PYTHONPATH": REPO_ROOT}
    env = container_env(ContainerSpec(["x"], {"PYTHONPATH": "/app", "PATH": f"{venv_bin}:/b"}))
    assert env["PYTHONPATH"] == "/app" and env["PATH"] == f"{venv_bin}:/b"
    image = container_env(ContainerSpec(["x"], {"A": "1"}, rootfs=Path("/img")))
    assert "PYTHONPATH" not in image and venv_bin not in image["PATH"]


def test_argv_enters_the_netns_and_a_private_mount_namespace_then_runs_the_init() -> None:
    spec = ContainerSpec(["python", "-m", "x"], {"HOME": "/tmp"}, workdir="/w", uid=10001)
    plan = build_plan(spec, "dl3-a")
    argv = build_argv("dl3-a", plan)
    assert argv[:10] == ["ip", "netns", "exec", "dl3-a", "unshare", "--mount",
                         "--propagation", "private", "--", sys.executable]  # fmt: skip
    assert argv[12].endswith("tests/cluster/launch.py")
    sent = json.loads(argv[13])
    assert sent["argv"] == ["python", "-m", "x"] and sent["uid"] == 10001
    assert sent["gid"] == 10001 and sent["workdir"] == "/w" and sent["chroot"] is None


def test_a_checkout_under_a_pod_volume_is_bound_back_inside_it() -> None:
    """CI may clone under /tmp, where every runtime pod mounts an emptyDir: the checkout and
    its venv would vanish inside the pod (seen: the fresh clone's cluster tests all failed)."""
    keep = ["/root/.pyenv/versions/3.11.7", "/tmp/ci/.venv", "/tmp/ci"]
    steps = plan_rebinds(keep, ["/tmp", "/var/lib/driftless"])
    assert steps == [["mkdir", "/tmp/ci"], ["bind", "/tmp/ci", "/tmp/ci", True]]
    # nothing to do when no volume covers a kept path
    assert plan_rebinds(["/work/main", "/work/main/.venv"], ["/tmp", "/etc/driftless/x"]) == []
