"""The local cluster's encoder host (tests/cluster/encoder_host.py) over real HTTP on
loopback, with a slow stand-in model: a lane serves in arrival order, a search does not wait
behind a bulk request, and a request whose client gave up is not encoded."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.cluster.encoder_host import MODELS, Models
from tests.encoder_server import start_server

MODEL = MODELS[0]


class Slow:
    """A model that takes ``seconds`` per call and records what it encoded."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str], kind: str) -> Any:
        self.calls.append(list(texts))
        time.sleep(self.seconds)
        return np.ones((len(texts), 4), np.float32)


@pytest.fixture
def host() -> Any:
    models = Models()
    slow = {lane: Slow(0.6) for lane in ("query", "passage")}
    for (_, lane), obj in models._lanes.items():
        obj._encoder = slow[lane]
    server, url = start_server(models.encode)
    yield models, slow, url + "/embeddings"
    server.shutdown()
    server.server_close()


def _post(url: str, text: str, kind: str, timeout: float = 10.0) -> float | None:
    """The answer's arrival time, None when the client gave up."""
    try:
        r = httpx.post(url, json={"model": MODEL, "input": [text], "input_type": kind}, timeout=timeout)
        r.raise_for_status()
        return time.monotonic()
    except httpx.TimeoutException:
        return None


def test_a_request_whose_client_gave_up_is_not_encoded(host: Any) -> None:
    models, slow, url = host
    first = threading.Thread(target=_post, args=(url, "bulk", "passage"))
    first.start()
    time.sleep(0.2)  # "bulk" holds the lane
    assert _post(url, "abandoned", "passage", timeout=0.2) is None
    first.join()
    assert _post(url, "after", "passage") is not None
    assert [c[0] for c in slow["passage"].calls] == ["bulk", "after"]
    assert models._lanes[(MODEL, "passage")].dropped == 1


def test_requests_are_served_in_arrival_order_and_a_search_skips_the_bulk_queue(host: Any) -> None:
    _, slow, url = host
    done: dict[str, float | None] = {}
    threads = []
    for i in range(4):
        t = threading.Thread(target=lambda i=i: done.__setitem__(f"p{i}", _post(url, f"p{i}", "passage")))
        t.start()
        threads.append(t)
        time.sleep(0.1)  # p0 < p1 < p2 < p3 in arrival
    assert (q := _post(url, "q", "query")) is not None
    for t in threads:
        t.join()
    assert [c[0] for c in slow["passage"].calls] == ["p0", "p1", "p2", "p3"]
    assert all(done[f"p{i}"] is not None for i in range(4))
    assert q < done["p2"]  # sent after p3, answered before the bulk queue drained
