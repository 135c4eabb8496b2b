"""The vLLM upstreams: session affinity (rendezvous hashing, so a session keeps hitting the server that holds
its prefix cache) and skipping upstreams that refuse connections until a probe finds them back."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import dataclass

import aiohttp

log = logging.getLogger("trainwire.upstreams")

DEAD_FOR_S = 2.0


@dataclass
class Upstream:
    url: str
    dead_until: float = 0.0

    @property
    def alive(self) -> bool:
        return self.dead_until <= time.monotonic()


class UpstreamPool:
    def __init__(self, urls: list[str], http: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        self.upstreams = [Upstream(u) for u in urls]
        self.http = http
        self.headers = headers

    def order(self, key: str) -> list[Upstream]:
        """Upstreams by preference for this key: the highest-scoring alive one first, dead ones last."""
        scored = sorted(self.upstreams, key=lambda u: zlib.crc32(f"{u.url}|{key}".encode()), reverse=True)
        return [u for u in scored if u.alive] + [u for u in scored if not u.alive]

    def mark_dead(self, upstream: Upstream) -> None:
        if upstream.alive:
            log.warning("upstream %s refused the connection; skipping it for %.0fs", upstream.url, DEAD_FOR_S)
        upstream.dead_until = time.monotonic() + DEAD_FOR_S

    async def probe(self, upstream: Upstream, timeout: float = 2.0) -> bool:
        try:
            async with self.http.get(
                f"{upstream.url}/v1/models", headers=self.headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                ok = resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        if ok:
            upstream.dead_until = 0.0
        return ok

    async def any_reachable(self) -> bool:
        results = await asyncio.gather(*(self.probe(u) for u in self.upstreams))
        return any(results)

    async def models(self, upstream: Upstream) -> list[dict]:
        async with self.http.get(
            f"{upstream.url}/v1/models", headers=self.headers, timeout=aiohttp.ClientTimeout(total=5)
        ) as resp:
            resp.raise_for_status()
            return (await resp.json()).get("data", [])
