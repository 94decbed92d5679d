"""kubectl as a real client: Debian's ``kubectl`` runs the install walkthrough of
``docs/install.md`` as written against the strict emulator served over HTTP, while the operator
runs in-process (in place of ``helm install``) against a real runtime. What kubectl needs of the
server is served by ``tests/strict_api.py``: discovery (short names, the ``driftless``
category), OpenAPI v3 (so kubectl sends ``fieldValidation=Strict`` and the server validates,
no ``--validate=false``), Table responses with the CRDs' printer columns, protobuf bodies of
``kubectl create``, watches with field selectors (``kubectl delete`` waits on them)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")

from index_runtime.service.engine import Engine
from tests.integration.test_operator import (  # noqa: F401  (runtime: a fixture)
    CRDS,
    runtime,
    start_operator,
    stop_operator,
)
from tests.kube_harness import find
from tests.strict_api import StrictAPI

ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = ROOT / "docs" / "install.md"
KUBECTL = shutil.which("kubectl")
PHASES = {"Pending", "ColdStart", "Training", "Validating", "Serving", "Degraded", "Retraining"}
pytestmark = [pytest.mark.kmock(cls=StrictAPI)]


def walkthrough(text: str) -> list[str]:
    """The commands of the ```bash blocks, in order, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in re.sub(r"\\\n\s*", "", block).splitlines():
            if cmd.strip() and not cmd.lstrip().startswith("#"):
                out.append(cmd.strip())
    return out


def test_walkthrough_is_parsed_with_its_continuations() -> None:
    cmds = walkthrough(WALKTHROUGH.read_text())
    helm = [c for c in cmds if c.startswith("helm ")]
    assert len(helm) == 1 and "watchNamespaces={search}" in helm[0]
    assert cmds.index("kubectl create namespace search") < cmds.index(helm[0])
    assert all(c.startswith(("kubectl ", "helm ")) for c in cmds), cmds


def taken(kmock: Any) -> bool:
    """The operator reported a phase and built the writer. The example keeps its data
    (``reclaimPolicy: Retain``), so it carries no finalizer: its deletion never waits for the
    operator, and garbage collection takes the children."""
    vi = find(kmock, "vectorindexes", "search", "docs") or {}
    writer = find(kmock, "statefulsets", "search", "docs-writer")
    return writer is not None and bool(vi.get("status", {}).get("phase"))


def kubeconfig(url: str, path: Path) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f'clusters: [{{name: emulator, cluster: {{server: "{url}"}}}}]\n'
        "users: [{name: tester, user: {token: test-token}}]\n"
        "contexts: [{name: emulator, context: {cluster: emulator, user: tester}}]\n"
        "current-context: emulator\n"
    )
    return path


async def run(cmd: str, env: dict[str, str], timeout: float = 90) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_shell(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {timeout} s"
    return int(proc.returncode or 0), out.decode()


async def until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


@pytest.mark.asyncio
async def test_install_walkthrough_runs_as_written(
    kmock: Any, runtime: tuple[str, Engine, str], tmp_path: Path  # noqa: F811
) -> None:
    if KUBECTL is None:
        pytest.skip("no kubectl: `make tools` installs Debian's kubernetes-client")
    url, _, _ = runtime
    kmock.register(CRDS)
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig")),
        "HOME": str(tmp_path),  # kubectl's discovery cache
    }
    out: dict[str, str] = {}
    operator = None
    try:
        for cmd in walkthrough(WALKTHROUGH.read_text()):
            if cmd.startswith("helm "):
                # the chart makes a Role in each watched namespace: refused (404) if missing
                watched = re.search(r"watchNamespaces=\{([^}]*)\}", cmd)
                assert watched, cmd
                missing = [n for n in watched.group(1).split(",") if n not in kmock.namespaces]
                assert not missing, f"helm install before the namespaces exist: {missing}"
                operator = await start_operator(kmock, url, clusterwide=False)
                continue
            if "driftless-system" in cmd:
                continue  # the chart's own Deployment: the operator runs in-process here
            code, text = await run(cmd, env)
            assert code == 0, f"$ {cmd}\n{text}"
            out[cmd] = text
            if cmd == "kubectl apply -f examples/":  # the operator takes the index on
                await until(lambda: taken(kmock), 60, "the operator never took the index")
        assert operator is not None, "the walkthrough installs no operator"
    finally:
        if operator is not None:
            await stop_operator(*operator)

    listing = out["kubectl get driftless -n search"]
    for name in ("embeddingmodel.driftless.dev/minilm", "vectorindex.driftless.dev/docs"):
        assert name in listing, listing
    wide = out["kubectl get vi -n search -o wide"].splitlines()
    header = wide[0].split()
    vi = next(c for c in CRDS if c["spec"]["names"]["kind"] == "VectorIndex")
    columns = vi["spec"]["versions"][0]["additionalPrinterColumns"]
    assert header == ["NAME", *[c["name"].upper() for c in columns]], wide
    name, phase = wide[1].split()[:2]
    assert name == "docs" and phase in PHASES, wide
    assert "theta" in out["kubectl explain vectorindex.spec.oracle"]
    assert "docs-to-e5" in out["kubectl get mm -n search -o wide"]
    # deletion finished: nothing held it, the children were collected, the namespace gone
    assert find(kmock, "vectorindexes", "search", "docs") is None
    left = [k for k in list(kmock.objects) if k[1] == "search" and not kmock.objects[k].deleted]
    assert not left, left
    assert "search" not in kmock.namespaces

