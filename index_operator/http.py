"""One lazily opened aiohttp session that sends and receives JSON: what the Kubernetes client
and the runtime client share. Errors stay theirs: this returns the status and the body."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from index_runtime import __version__

USER_AGENT = f"driftless-operator/{__version__}"


class JsonHttp:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        *,
        token: str | None = None,
        content_type: str = "application/json",
        timeout_s: float = 30.0,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> tuple[int, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Content-Type": content_type, "User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self._session.request(
            method,
            url,
            data=None if body is None else json.dumps(body),
            headers=headers,
            ssl=ssl_context,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            return resp.status, await resp.text()

    async def stream(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 330.0,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> AsyncIterator[str]:
        """The lines of a streamed GET (a Kubernetes watch); an HTTP error is raised as
        ``aiohttp.ClientResponseError`` (status and body text in its message)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self._session.get(
            url,
            headers=headers,
            ssl=ssl_context,
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=30),
        ) as resp:
            if resp.status >= 400:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message=await resp.text()
                )
            async for raw in resp.content:
                yield raw.decode()
