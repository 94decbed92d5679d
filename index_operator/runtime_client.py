"""The runtime's HTTP API as the operator uses it (status and admin calls; aiohttp, async)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from index_operator.http import JsonHttp


class RuntimeError_(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}" if reason else message)
        self.status = status
        self.reason = reason
        self.message = message


MISSING: dict[str, Any] = {}  # the runtime answers but has no such index


class RuntimeClient:
    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._http = JsonHttp()

    async def close(self) -> None:
        await self._http.close()

    async def _call(self, method: str, url: str, token: str | None = None, body: Any = None) -> Any:
        status, text = await self._http.request(
            method, url, body, token=token, timeout_s=self.timeout_s
        )
        data = json.loads(text) if text else None
        if status >= 400:
            d = data if isinstance(data, dict) else {}
            raise RuntimeError_(status, str(d.get("error", "")), str(d.get("message", text)))
        return data

    async def status(
        self, base: str, index: str, token: str | None = None
    ) -> dict[str, Any] | None:
        """The index's status document; ``MISSING`` when the runtime has no such index; None
        when the runtime does not answer (or refuses the token: logged by the caller's next
        admin call, which fails the same way)."""
        try:
            return dict(await self._call("GET", f"{base}/v1/indexes/{index}/status", token))
        except RuntimeError_ as exc:
            if exc.status == 404:
                return MISSING
            return None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def create_index(
        self,
        base: str,
        token: str,
        name: str,
        model: str,
        dim: int,
        metric: str,
        key_type: str,
        settings: Mapping[str, Any],
    ) -> None:
        body = {
            "name": name,
            "model": model,
            "dim": dim,
            "metric": metric,
            "key_type": key_type,
            "settings": dict(settings),
        }
        try:
            await self._call("POST", f"{base}/v1/indexes", token, body)
        except RuntimeError_ as exc:
            if exc.status != 409:  # a replay: it exists
                raise

    async def admin(
        self, base: str, token: str, index: str, action: str, body: Any = None, method: str = "POST"
    ) -> Any:
        return await self._call(
            method, f"{base}/v1/indexes/{index}/admin/{action}", token, body or {}
        )
