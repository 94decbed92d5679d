"""What the kubelet of the local cluster does to one pod, as PURE functions (no I/O):

* the container's argv: ``command``/``args`` over the image's ENTRYPOINT/CMD, which come from
  the Dockerfile target the image is built from (``parse_dockerfile``, ``image_target``);
* its environment: ``value`` with ``$(VAR)`` expansion, ``valueFrom`` (Secret / ConfigMap keys,
  ``fieldRef``), ``envFrom``, over the image's ``ENV``;
* its volumes: the files of ConfigMap and Secret volumes with their modes, which mounts are
  directories the kubelet provides (emptyDir, PVC);
* probes: ``ProbeSpec`` from a container's probe, ``probe_step`` the verdict after one result;
* restarts: ``crash_backoff`` (CrashLoopBackOff, compressed: 1, 2, 4 s by default).

The Kubernetes semantics followed are the documented ones; where the local cluster simplifies
(no image pull, a compressed backoff) the docstring says so.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a base image's
Lookup = Callable[[str, str], "Mapping[str, bytes] | None"]  # (kind, name) -> decoded data


class ConfigError(Exception):
    """A reference the pod needs is missing (the kubelet's CreateContainerConfigError)."""


# --- images: the Dockerfile's targets --------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """What a Dockerfile stage leaves in its image's config (inherited through ``FROM``)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    user: str = ""
    workdir: str = ""


def _exec_form(rest: str) -> tuple[str, ...]:
    rest = rest.strip()
    if rest.startswith("["):
        return tuple(str(x) for x in json.loads(rest))
    return ("/bin/sh", "-c", rest)  # the shell form


def _env_pairs(rest: str) -> list[tuple[str, str]]:
    words = shlex.split(rest)
    if len(words) >= 2 and "=" not in words[0]:  # legacy `ENV KEY value`
        return [(words[0], " ".join(words[1:]))]
    return [(w.partition("=")[0], w.partition("=")[2]) for w in words]


def parse_dockerfile(text: str) -> dict[str, ImageConfig]:
    """Stage name -> its image config. ``ENTRYPOINT`` resets an inherited ``CMD`` (as Docker
    does); ``ENV`` values expand ``$VAR`` / ``${VAR}`` from earlier ones (PATH=/x:$PATH)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, ImageConfig] = {}
    cur: dict[str, Any] | None = None
    name = ""

    def close() -> None:
        if cur is not None and name:
            stages[name] = ImageConfig(
                entrypoint=cur["entrypoint"], cmd=cur["cmd"], env=tuple(cur["env"].items()),
                user=cur["user"], workdir=cur["workdir"],
            )

    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            close()
            parts = rest.split()
            base = stages.get(parts[0], ImageConfig(env=(("PATH", DOCKER_PATH),)))
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else ""
            cur = {"entrypoint": base.entrypoint, "cmd": base.cmd, "env": dict(base.env),
                   "user": base.user, "workdir": base.workdir}
        elif cur is None:
            continue  # ARG before the first FROM
        elif word == "ENTRYPOINT":
            cur["entrypoint"], cur["cmd"] = _exec_form(rest), ()
        elif word == "CMD":
            cur["cmd"] = _exec_form(rest)
        elif word == "ENV":
            env: dict[str, str] = cur["env"]
            for k, v in _env_pairs(rest):
                env[k] = re.sub(r"\$\{?(\w+)\}?", lambda m, e=env: str(e.get(m.group(1), "")), v)
        elif word == "USER":
            cur["user"] = rest.strip()
        elif word == "WORKDIR":
            cur["workdir"] = rest.strip()
    close()
    return stages


def image_target(image: str) -> str:
    """The Dockerfile target an image reference names: ``<registry>/driftless-<target>:<tag>``
    (the chart's and the operator's image names; ``make images`` tags them so)."""
    last = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return last.removeprefix("driftless-")


def container_argv(container: Mapping[str, Any], image: ImageConfig) -> list[str]:
    """Kubernetes' rule: ``command`` replaces ENTRYPOINT (and drops CMD); ``args`` replace
    CMD. ``$(VAR)`` expansion is applied by the caller (``expand``)."""
    command, args = container.get("command"), container.get("args")
    if command:
        return [*command, *(args or [])]
    argv = [*image.entrypoint, *(image.cmd if args is None else args)]
    if not argv:
        raise ConfigError(f"container {container.get('name')}: no command and no ENTRYPOINT/CMD")
    return argv


# --- environment ------------------------------------------------------------------------------


def default_home(uid: int, passwd: str | None) -> str:
    """HOME as the container runtime sets it when the image and the pod leave it unset: the
    user's home from the image's /etc/passwd, else "/" (containerd, runc). Without it a uid
    with no passwd entry (process mode) cannot expand ``~`` (Path.home() raises)."""
    for line in (passwd or "").splitlines():
        parts = line.split(":")
        if len(parts) >= 6 and parts[2] == str(uid):
            return parts[5] or "/"
    return "/"


def expand(value: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` from ``env`` (left as is when undefined), ``$$`` escapes a ``$``."""
    return re.sub(
        r"\$\$|\$\((\w+)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def decode_data(obj: Mapping[str, Any], secret: bool) -> dict[str, bytes]:
    """A ConfigMap's ``data``/``binaryData`` or a Secret's ``data`` (base64) and ``stringData``
    (kept as sent by the emulator; the API server would have folded it into ``data``)."""
    out: dict[str, bytes] = {}
    if secret:
        out.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        out.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
    else:
        out.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """A ``fieldRef.fieldPath`` of the downward API."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    m = _FIELD.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or ()),
    }
    if path not in simple:
        raise ConfigError(f"fieldRef {path} is not supported")
    return str(simple[path] or "")


def _key_ref(kind: str, ref: Mapping[str, Any], lookup: Lookup) -> str | None:
    data = lookup(kind, str(ref.get("name", "")))
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"{kind} {ref.get('name')} has no key {ref['key']}")
    return data[ref["key"]].decode()


def resolve_env(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    lookup: Lookup,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment in Kubernetes' order: ``base`` (the image's ENV),
    ``envFrom`` sources, then ``env`` entries (later ones may refer to earlier ones)."""
    env = dict(base or {})
    for src in container.get("envFrom") or ():
        kind = "configmaps" if "configMapRef" in src else "secrets"
        ref = src.get("configMapRef") or src.get("secretRef") or {}
        data = lookup(kind, str(ref.get("name", "")))
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f"{kind} {ref.get('name')} not found")
        prefix = str(src.get("prefix", ""))
        env.update({prefix + k: v.decode() for k, v in data.items()})
    for e in container.get("env") or ():
        name = str(e["name"])
        if "value" in e:
            env[name] = expand(str(e["value"]), env)
            continue
        vf = e.get("valueFrom") or {}
        value: str | None
        if "secretKeyRef" in vf:
            value = _key_ref("secrets", vf["secretKeyRef"], lookup)
        elif "configMapKeyRef" in vf:
            value = _key_ref("configmaps", vf["configMapKeyRef"], lookup)
        elif "fieldRef" in vf:
            value = field_value(pod, str(vf["fieldRef"]["fieldPath"]))
        elif not vf:
            value = ""  # `- name: X` alone sets it empty
        else:
            raise ConfigError(f"env {name}: {sorted(vf)} is not supported")
        if value is not None:
            env[name] = value
    return env


# --- volumes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeFiles:
    """The files of a ConfigMap or Secret volume: relative path -> (content, mode)."""

    files: dict[str, tuple[bytes, int]]


def projected_files(volume: Mapping[str, Any], lookup: Lookup) -> VolumeFiles | None:
    """The files a configMap / secret volume shows (None: not such a volume). ``items``
    select and rename keys; ``defaultMode`` (0644) and per-item ``mode`` apply."""
    if "configMap" in volume:
        src, kind, name = volume["configMap"], "configmaps", volume["configMap"].get("name", "")
    elif "secret" in volume:
        src, kind, name = volume["secret"], "secrets", volume["secret"].get("secretName", "")
    else:
        return None
    data = lookup(kind, str(name))
    if data is None:
        if src.get("optional"):
            return VolumeFiles({})
        raise ConfigError(f"{kind} {name} not found (volume {volume.get('name')})")
    mode = int(src.get("defaultMode", 0o644))
    items = src.get("items") or [{"key": k, "path": k} for k in sorted(data)]
    files: dict[str, tuple[bytes, int]] = {}
    for it in items:
        if it["key"] not in data:
            if src.get("optional"):
                continue
            raise ConfigError(f"{kind} {name} has no key {it['key']}")
        files[str(it["path"])] = (data[it["key"]], int(it.get("mode", mode)))
    return VolumeFiles(files)


def claim_name(template: str, statefulset: str, ordinal: int) -> str:
    """The PVC a StatefulSet pod gets from a volumeClaimTemplate (``wal-docs-writer-0``)."""
    return f"{template}-{statefulset}-{ordinal}"


# --- probes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSpec:
    """An httpGet probe with its timings in seconds (already scaled)."""

    path: str
    port: int
    period_s: float
    timeout_s: float
    initial_delay_s: float
    failure_threshold: int
    success_threshold: int


def probe_spec(
    probe: Mapping[str, Any] | None, container: Mapping[str, Any], scale: float = 1.0
) -> ProbeSpec | None:
    """From a container's probe (named ports resolved from its ``ports``); defaults as
    Kubernetes' (period 10 s, timeout 1 s, failure 3, success 1). ``scale`` compresses the
    period and the initial delay, not the timeout: how long a loaded pod takes to answer does
    not shrink with the test's clock (scaled to 1.25 s, the campaign's busy pods timed out
    together and were all killed at once)."""
    if not probe or "httpGet" not in probe:
        return None
    port: Any = probe["httpGet"].get("port")
    if isinstance(port, str) and not port.isdigit():
        named = {p.get("name"): p["containerPort"] for p in container.get("ports") or ()}
        if port not in named:
            raise ConfigError(f"probe port {port!r} is not a port of {container.get('name')}")
        port = named[port]
    return ProbeSpec(
        path=str(probe["httpGet"].get("path", "/")),
        port=int(port),
        period_s=float(probe.get("periodSeconds", 10)) * scale,
        timeout_s=float(probe.get("timeoutSeconds", 1)),
        initial_delay_s=float(probe.get("initialDelaySeconds", 0)) * scale,
        failure_threshold=int(probe.get("failureThreshold", 3)),
        success_threshold=int(probe.get("successThreshold", 1)),
    )


@dataclass(frozen=True)
class ProbeCounter:
    """Consecutive results of one probe and its verdict (``passing``)."""

    passing: bool
    successes: int = 0
    failures: int = 0


def probe_step(c: ProbeCounter, ok: bool, spec: ProbeSpec) -> ProbeCounter:
    """The verdict after one result: it flips only after ``success_threshold`` consecutive
    successes or ``failure_threshold`` consecutive failures."""
    if ok:
        n = c.successes + 1
        return ProbeCounter(c.passing or n >= spec.success_threshold, n, 0)
    n = c.failures + 1
    return ProbeCounter(c.passing and n < spec.failure_threshold, 0, n)


@dataclass(frozen=True)
class Probes:
    """The three probes of a container. ``startup`` gates the other two (they do not run
    until it has passed once); a failing startup or liveness probe restarts the container."""

    startup: ProbeSpec | None = None
    liveness: ProbeSpec | None = None
    readiness: ProbeSpec | None = None
    counters: dict[str, ProbeCounter] = field(default_factory=dict)


def container_probes(container: Mapping[str, Any], scale: float = 1.0) -> Probes:
    return Probes(
        startup=probe_spec(container.get("startupProbe"), container, scale),
        liveness=probe_spec(container.get("livenessProbe"), container, scale),
        readiness=probe_spec(container.get("readinessProbe"), container, scale),
    )


def initial_counter(kind: str) -> ProbeCounter:
    """Before any result: liveness passes, readiness and startup do not (a container with no
    readiness probe is ready once running: the caller checks for the probe's absence)."""
    return ProbeCounter(passing=kind == "liveness")


# --- restarts ---------------------------------------------------------------------------------


def crash_backoff(restarts: int, base_s: float = 1.0, cap_s: float = 4.0) -> float:
    """Seconds before restarting a container that exited, after ``restarts`` restarts so far:
    base, 2·base, 4·base ... capped (kubelet: 10 s doubling to 5 min; compressed here)."""
    return float(min(base_s * (2 ** max(restarts, 0)), cap_s))


def restarts_container(policy: str, exit_code: int) -> bool:
    """Whether ``restartPolicy`` restarts a container that exited with ``exit_code``."""
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)
