"""``make images``: build the three images of the Dockerfile with buildah and start each.

No Docker daemon and nothing pulled from a container registry: the base is a Debian rootfs
made with debootstrap (minbase + python3, python3-venv, ca-certificates and a ``python`` link,
cached as a tarball under ``.driftless/images/``), imported with buildah (vfs driver, chroot
isolation, its own storage root under that directory) and passed as ``PYTHON_IMAGE``. The
host's pip configuration, the local paths it names and the CA bundle are mounted at build time
only (never copied into an image). Then ``tools/image_checks.py`` starts each image as uid
10001, and the sizes and times go to ``bench/results/images.{json,md}``.

Every step is named; a failure prints ``make images: step '<name>' failed`` and exits 1.
Containers and images are removed at the end (``--keep`` keeps the images for a faster rerun;
the rootfs tarball is always kept).

    python tools/images.py [--keep] [--reuse] [--suite bookworm]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".driftless" / "images"
RESULTS = ROOT / "bench" / "results"
TARGETS = ("runtime", "operator", "jobs")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# the operator image holds the control plane only (docs/architecture.md, "Images")
OPERATOR_FORBIDDEN = ("faiss", "torch", "pyarrow")
UID = 10001
# buildah's default nofile (1048576) is refused on hosts with a lower hard limit
ULIMIT = "nofile=20000:20000"


class StepFailed(RuntimeError):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"make images: step '{step}' failed: {detail}")
        self.step = step


# pure parts -------------------------------------------------------------------------------


def debian_source(sources: Mapping[str, str]) -> tuple[str, str]:
    """(mirror URI, suite) of the host's first Debian release source, read from apt's
    configuration (``{path: text}`` of sources.list files and deb822 ``.sources`` files), so
    no mirror name is written into the repository. Update/security suites are skipped."""
    for path in sorted(sources):
        text = sources[path]
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for suite in fields.get("suites", "").split():
                    if "-" not in suite and "/" not in suite:
                        return fields.get("uris", "").split()[0], suite
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and "-" not in parts[2]:
                    return parts[1], parts[2]
    raise ValueError("no Debian release source in apt's configuration")


def parse_pip_config(listing: str) -> dict[str, str]:
    """``pip config list`` output -> {"section.key": value}; environment values (``:env:.x``)
    override the files' ``global.x``, as they do for pip itself."""
    out: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in listing.splitlines():
        m = re.match(r"^(\S+?)\.([\w-]+)='(.*)'$", line.strip())
        if not m:
            continue
        section, key, value = m.groups()
        if section == ":env:":
            env[f"global.{key}"] = value
        elif not section.startswith(":"):
            out[f"{section}.{key}"] = value
    return {**out, **env}


PATH_KEYS = ("find-links", "index-url", "extra-index-url", "constraint", "requirement", "cert")


def pip_conf_and_mounts(config: Mapping[str, str]) -> tuple[str, list[str]]:
    """A pip.conf reproducing ``config`` and the local paths it names (``file://`` URLs and
    absolute paths in find-links, constraints and the CA bundle; for a local index, the
    directory holding it, whose files it links to): the build mounts them read-only at the
    same place. Timeouts and other scalar options pass as they
    are; the cache is off in the images anyway."""
    sections: dict[str, list[str]] = {}
    paths: list[str] = []
    for dotted, value in sorted(config.items()):
        section, key = dotted.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {value}")
        if key in PATH_KEYS:
            for item in value.split():
                local = item[len("file://") :] if item.startswith("file://") else item
                if key.endswith("index-url"):
                    # a simple index links to its files relative to itself (../../files/…):
                    # the repository is the directory holding the index
                    local = str(Path(local.rstrip("/")).parent)
                if local.startswith("/") and local not in paths:
                    paths.append(local)
    text = "".join(
        f"[{s}]\n" + "".join(f"{line}\n" for line in lines) for s, lines in sections.items()
    )
    return text, paths


def forbidden_in(listing: Iterable[str], names: Iterable[str] = OPERATOR_FORBIDDEN) -> list[str]:
    """Entries of a site-packages listing that belong to a forbidden distribution (package
    dirs, ``*.dist-info``, ``*.libs``; case and ``-``/``_`` insensitive): ``faiss_cpu-1.9.dist-
    info`` and ``faiss`` both count, ``faissless`` does not."""
    bad = []
    for entry in listing:
        stem = re.split(r"[-.]", entry.strip().lower().replace("-", "_"), maxsplit=1)[0]
        if any(stem == n or stem.startswith(f"{n}_") for n in names):
            bad.append(entry.strip())
    return sorted(bad)


@dataclass
class Report:
    """What the run measured: seconds per step, bytes per image, what each start check saw."""

    steps: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def render_markdown(r: Report) -> str:
    mib = 1 << 20
    lines = [
        "# Images (`make images`: buildah, vfs, chroot isolation, debootstrap base)",
        "",
        f"{r.meta.get('when', '')} on {r.meta.get('cores', '?')} cores; "
        f"base cache {'hit' if r.meta.get('base_cached') else 'miss (debootstrap ran)'}"
        + (f"; reused (not rebuilt): {', '.join(r.meta['reused'])}" if r.meta.get("reused") else "")
        + ".",
        "",
        "| image | size MiB | build s | start check |",
        "|---|---:|---:|---|",
    ]
    for name in ("base", *TARGETS):
        size = r.sizes.get(name)
        lines.append(
            f"| {name} | {size / mib:,.0f} | {r.steps.get(f'build {name}', r.steps.get(name, 0)):.0f}"
            f" | {r.checks.get(name, '-')} |"
            if size is not None
            else f"| {name} | - | - | {r.checks.get(name, '-')} |"
        )
    lines += ["", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r.steps.items()]
    lines += ["", f"total {sum(r.steps.values()):.0f} s"]
    return "\n".join(lines) + "\n"


# edges ------------------------------------------------------------------------------------


def run(
    cmd: list[str], step: str, stream: bool = False, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command; a non-zero exit is the step's failure, with the output's tail.
    ``stream`` echoes the output as it comes (long builds show their progress)."""
    if not stream:
        out = subprocess.run(cmd, text=True, capture_output=True, **kw)
    else:
        lines: list[str] = []
        with subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, **kw) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(f"   | {line}", end="", flush=True)
                lines = [*lines[-200:], line]
        out = subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), "")
    if out.returncode != 0:
        tail = (out.stdout + out.stderr)[-4000:]
        raise StepFailed(step, f"{' '.join(cmd[:6])}… exited {out.returncode}\n{tail}")
    return out


@contextmanager
def timed(report: Report, step: str) -> Iterator[None]:
    print(f"== images: {step}", flush=True)
    t = time.perf_counter()
    try:
        yield
    except StepFailed:
        raise
    except Exception as e:  # anything else in a step is that step's failure too
        raise StepFailed(step, f"{type(e).__name__}: {e}") from e
    report.steps[step] = round(time.perf_counter() - t, 1)
    print(f"   {step}: {report.steps[step]:.1f} s", flush=True)


class Buildah:
    """buildah with this run's storage (vfs under .driftless/images/storage) and chroot
    isolation: nothing shared with other buildah users of the host."""

    def __init__(self, work: Path) -> None:
        self.base = [
            "buildah",
            "--storage-driver",
            "vfs",
            "--root",
            str(work / "storage"),
            "--runroot",
            str(work / "run"),
        ]

    def __call__(self, step: str, *args: str, **kw: Any) -> str:
        return run([*self.base, *args], step, **kw).stdout.strip()

    def exists(self, ref: str) -> bool:
        return subprocess.run([*self.base, "inspect", "--type", "image", ref],
                              capture_output=True).returncode == 0

    def size(self, ref: str) -> int:
        """Bytes of the image's layers (uncompressed tars, as stored)."""
        manifest = json.loads(json.loads(self("sizes", "inspect", "--type", "image", ref))["Manifest"])
        return sum(int(layer["size"]) for layer in manifest["layers"])


def ensure_tools(report: Report) -> None:
    with timed(report, "tools"):
        if shutil.which("buildah") and shutil.which("debootstrap"):
            return
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        run([*sudo, "apt-get", "update", "-qq"], "tools")
        run([*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq",
             "buildah", "debootstrap"], "tools")


def read_apt_sources() -> dict[str, str]:
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    return {str(p): p.read_text() for p in files
            if p.is_file() and p.suffix in (".list", ".sources")}


def base_tarball(report: Report, suite: str | None) -> Path:
    """The debootstrap rootfs as a tarball, made once per (suite, packages)."""
    mirror, default_suite = debian_source(read_apt_sources())
    suite = suite or default_suite
    key = hashlib.sha256(f"{suite} {' '.join(BASE_PACKAGES)} python-link".encode()).hexdigest()
    tar = WORK / f"base-{suite}-{key[:12]}.tar"
    report.meta["base_cached"] = tar.exists()
    if tar.exists():
        return tar
    with timed(report, "debootstrap"):
        rootfs = WORK / "rootfs"
        if rootfs.exists():
            shutil.rmtree(rootfs)
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             suite, str(rootfs), mirror], "debootstrap")
        (rootfs / "usr/bin/python").unlink(missing_ok=True)
        (rootfs / "usr/bin/python").symlink_to("python3")  # python:*-slim images have `python`
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        run(["tar", "-C", str(rootfs), "-cf", str(tar) + ".part", "."], "debootstrap")
        os.replace(str(tar) + ".part", tar)
        shutil.rmtree(rootfs)
    return tar


def import_base(bh: Buildah, tar: Path, ref: str) -> None:
    """The rootfs tarball as an image: unpacked into a scratch container and committed
    (buildah 1.28 has no ``import``)."""
    c = bh("import base", "from", "scratch")
    try:
        mnt = bh("import base", "mount", c)
        run(["tar", "-C", mnt, "-xf", str(tar)], "import base")
        bh("import base", "umount", c)
        bh("import base", "config", "--cmd", "python3", "--env", "LANG=C.UTF-8", c)
        bh("import base", "commit", "--quiet", c, ref)
    finally:
        subprocess.run([*bh.base, "rm", c], capture_output=True)


def pip_build_mounts() -> tuple[list[str], dict[str, str]]:
    """``-v`` arguments: the host's pip configuration (written under .driftless/images as one
    pip.conf), the local paths it names and the CA bundle; all read-only, build time only."""
    listing = run([sys.executable, "-m", "pip", "config", "list"], "pip config").stdout
    config = parse_pip_config(listing)
    text, paths = pip_conf_and_mounts(config)
    conf = WORK / "pip.conf"
    conf.write_text(text)
    mounts = [f"{conf}:/etc/pip.conf:ro"]
    mounts += [f"{p}:{p}:ro" for p in paths if Path(p).exists() and not p.startswith("/etc/ssl")]
    if Path("/etc/ssl/certs").is_dir():
        mounts.append("/etc/ssl/certs:/etc/ssl/certs:ro")
    return [a for m in mounts for a in ("-v", m)], config


def build(
    report: Report, bh: Buildah, base_ref: str, reuse: bool, targets: tuple[str, ...] = TARGETS
) -> dict[str, str]:
    volumes, _ = pip_build_mounts()
    refs = {}
    torch_index = os.environ.get("TORCH_INDEX_URL", "")
    for target in targets:
        ref = f"localhost/driftless-{target}:dev"
        refs[target] = ref
        if reuse and bh.exists(ref):
            report.meta.setdefault("reused", []).append(target)
            continue
        with timed(report, f"build {target}"):
            bh(f"build {target}", "bud", "--isolation", "chroot", "--layers", "--ulimit", ULIMIT,
               *volumes, "--build-arg", f"PYTHON_IMAGE={base_ref}",
               "--build-arg", f"TORCH_INDEX_URL={torch_index}",
               "--target", target, "-t", ref, "-f", str(ROOT / "Dockerfile"), str(ROOT),
               stream=True, env={**os.environ, "BUILDAH_ISOLATION": "chroot"})
    return refs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the images (a rerun reuses layers)")
    p.add_argument("--reuse", action="store_true", help="skip builds of images already there")
    p.add_argument("--suite", default=None, help="Debian suite (default: the host's)")
    p.add_argument("--skip-checks", action="store_true", help="build only")
    p.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=list(TARGETS),
        help="Dockerfile targets to build and start (default: all three)",
    )
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    report = Report(meta={"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "cores": os.cpu_count()})
    bh = Buildah(WORK)
    try:
        ensure_tools(report)
        tar = base_tarball(report, args.suite)
        base_ref = f"localhost/driftless-pybase:{tar.stem.removeprefix('base-')}"
        if not bh.exists(base_ref):
            with timed(report, "import base"):
                import_base(bh, tar, base_ref)
        refs = build(report, bh, base_ref, args.reuse, tuple(args.targets))
        report.meta["targets"] = list(args.targets)
        with timed(report, "sizes"):
            report.sizes = {"base": bh.size(base_ref), **{t: bh.size(r) for t, r in refs.items()}}
        if args.skip_checks:  # a build without its start checks is no report
            print(render_markdown(report))
            return 0
        from tools.image_checks import run_checks

        run_checks(report, bh, refs, timed)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "images.json").write_text(json.dumps(report.__dict__, indent=1) + "\n")
        (RESULTS / "images.md").write_text(render_markdown(report))
        print(render_markdown(report))
        return 0
    except StepFailed as e:
        print(f"\n{e}", file=sys.stderr, flush=True)
        return 1
    finally:
        (WORK / "pip.conf").unlink(missing_ok=True)  # the host's configuration: build time only
        subprocess.run([*bh.base, "rm", "--all"], capture_output=True)
        if not args.keep:
            subprocess.run([*bh.base, "rmi", "--all", "--force"], capture_output=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
