"""Kube.apply when the watch cache lags the API server: an object the cache still holds but
that was deleted meanwhile (a Secret deleted to rotate the tokens) answers the PATCH with
404; apply creates it instead of failing the pass (kopf then backed off 60 s: a CI
rehearsal's operator test timed out waiting for the rotation)."""

from __future__ import annotations

import asyncio
from typing import Any

from index_operator.kube import Kube, KubeError


class Api(Kube):
    """The HTTP layer replaced: PATCH answers ``patch_status``, POST 201 (or 409)."""

    def __init__(self, patch_status: int, post_status: int = 201) -> None:
        super().__init__(server="http://api")
        self.patch_status, self.post_status = patch_status, post_status
        self.calls: list[str] = []

    async def _call(self, method: str, url: str, body: Any = None, content_type: str = "",
                    verb: str = "") -> Any:  # fmt: skip
        self.calls.append(method)
        status = {"PATCH": self.patch_status, "POST": self.post_status}.get(method, 200)
        if status >= 400:
            raise KubeError(status, "{}")
        return {}


SECRET = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "t", "namespace": "s"}}
STALE = {"metadata": {"annotations": {}}}  # what the cache holds: another hash, so a patch


def test_a_patch_of_an_object_deleted_since_the_cache_saw_it_creates_it() -> None:
    api = Api(patch_status=404)
    assert asyncio.run(api.apply(SECRET, STALE)) == "created"
    assert api.calls == ["PATCH", "POST"]


def test_other_patch_failures_and_a_create_race_still_fail_the_pass() -> None:
    for api in (Api(patch_status=500), Api(patch_status=404, post_status=409)):
        try:
            asyncio.run(api.apply(SECRET, STALE))
        except KubeError:
            pass
        else:
            raise AssertionError("applied")
    assert asyncio.run(Api(patch_status=200).apply(SECRET, STALE)) == "patched"
