"""Pods run as uid 10001, which may have no passwd entry and no HOME (the local cluster's
processes; images run under an arbitrary uid). Every ``driftless`` command built its parser
with the demo's cache default, ``Path.home()``, and died before parsing: the writer, readers,
Jobs and the operator never started on the local cluster."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from index_runtime import cli


@pytest.fixture
def homeless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)


@pytest.mark.usefixtures("homeless")
def test_a_pod_command_parses_without_a_home() -> None:
    args = cli.build_parser().parse_args(["serve", "--from-env", "--role", "writer"])
    assert args.role == "writer"


@pytest.mark.usefixtures("homeless")
def test_the_demo_cache_falls_back_to_the_temp_dir() -> None:
    assert cli._default_cache().name == "driftless-cache"


def test_the_demo_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli._default_cache() == tmp_path / "driftless"
