"""Publish new weights into running vLLM servers, over vLLM's own HTTP endpoints.

- LoRA: `POST /v1/load_lora_adapter` under a new name per version (vLLM 0.32 re-reads an in-place adapter
  from disk on every step, so names are never reused); old adapters are unloaded after a grace period so
  requests already routed to them finish. Needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`.
- Full weights: pause every upstream (keeping in-flight requests), reload in place with
  `collective_rpc reload_weights`, reset the prefix cache (stale KV would mix versions), stamp the weight
  version, resume. Needs `VLLM_SERVER_DEV_MODE=1`. Upstreams are always resumed, also on failure.

Each HTTP call is retried (tenacity) on connection errors and 5xx; an upstream that still fails is reported
so the store can say which upstream serves which version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger("trainwire.publish")


class PublishError(Exception):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status  # the upstream's HTTP status (0: none)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, PublishError):
        return getattr(exc, "status", 0) >= 500
    return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError))


@dataclass
class PublishResult:
    version: int
    served_model: str
    reached: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class Publisher:
    def __init__(
        self,
        upstreams: list[str],
        *,
        kind: str,
        policy_name: str,
        api_key: str | None = None,
        lora_grace_s: float = 120.0,
        attempts: int = 4,
    ) -> None:
        self.upstreams = upstreams
        self.kind = kind
        self.policy_name = policy_name
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.lora_grace_s = lora_grace_s
        self.attempts = attempts
        self.loaded: list[tuple[str, float]] = []  # (adapter name, time it was superseded or inf)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Publisher":
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._http:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("Publisher is used outside `async with`")
        return self._http

    async def _post(self, url: str, path: str, *, json: dict | None = None, params: dict | None = None) -> str:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.2, max=3),
            retry=retry_if_exception(_retryable),
            reraise=True,
        ):
            with attempt:
                async with self.http.post(f"{url}{path}", json=json, params=params, headers=self.headers) as r:
                    text = await r.text()
                    if r.status >= 400:
                        raise PublishError(f"{path} on {url}: HTTP {r.status}: {text[:500]}", r.status)
                    return text
        raise AssertionError("unreachable")

    def adapter_name(self, version: int) -> str:
        return f"{self.policy_name}-v{version}"

    async def publish(self, version: int, weights_path: str, only: list[str] | None = None) -> PublishResult:
        """Into every upstream, or `only` these (an upstream that restarted and lost the current version)."""
        t0 = time.perf_counter()
        urls = self.upstreams if only is None else [u for u in self.upstreams if u in only]
        if self.kind == "lora":
            result = await self._publish_lora(version, weights_path, urls)
        else:
            result = await self._publish_full(version, weights_path, urls)
        result.seconds = time.perf_counter() - t0
        return result

    async def _publish_lora(self, version: int, path: str, urls: list[str]) -> PublishResult:
        name = self.adapter_name(version)
        result = PublishResult(version, name)
        body = {"lora_name": name, "lora_path": path}

        async def one(url: str) -> None:
            try:
                try:
                    await self._post(url, "/v1/load_lora_adapter", json=body)
                except PublishError as exc:
                    # A trainer that crashed after loading this version but before recording it left the
                    # name behind; vLLM refuses a second load under it (and 0.32's load_inplace re-reads the
                    # adapter from disk on every step), so swap it: unload, then load the new weights.
                    if getattr(exc, "status", 0) != 400 or "already been loaded" not in str(exc):
                        raise
                    await self._post(url, "/v1/unload_lora_adapter", json={"lora_name": name})
                    await self._post(url, "/v1/load_lora_adapter", json=body)
                result.reached.append(url)
            except Exception as exc:
                result.failed[url] = str(exc)

        await asyncio.gather(*(one(u) for u in urls))
        if result.reached:
            now = time.monotonic()
            self.loaded = [(n, min(t, now)) for n, t in self.loaded if n != name] + [(name, float("inf"))]
        return result

    async def adopt_loaded(self, current_version: int) -> list[str]:
        """After a restart: adapters of this policy that an earlier trainer loaded (``<policy>-v<N>``) are
        tracked again, so the superseded ones are unloaded after the grace period like any other."""
        if self.kind != "lora":
            return []
        prefix = f"{self.policy_name}-v"
        found: set[str] = set()
        for url in self.upstreams:
            try:
                found |= {
                    m for m in await self.served_models(url) if m.startswith(prefix) and m[len(prefix) :].isdigit()
                }
            except Exception as exc:
                log.warning("could not list adapters on %s: %s", url, exc)
        now = time.monotonic()
        ordered = sorted(found, key=lambda n: int(n[len(prefix) :]))
        current = self.adapter_name(current_version)
        known = {n for n, _ in self.loaded}
        self.loaded = (
            [(n, now) for n in ordered if n != current and n not in known]
            + self.loaded
            + ([(current, float("inf"))] if current in found and current not in known else [])
        )
        return ordered

    async def unload_expired(self) -> list[str]:
        """Unload adapters superseded more than the grace period ago (never the newest)."""
        now = time.monotonic()
        expired = [n for n, t in self.loaded[:-1] if now - t >= self.lora_grace_s]
        for name in expired:
            for url in self.upstreams:
                try:
                    await self._post(url, "/v1/unload_lora_adapter", json={"lora_name": name})
                except Exception as exc:
                    log.warning("could not unload %s from %s: %s", name, url, exc)
        self.loaded = [(n, t) for n, t in self.loaded if n not in expired]
        return expired

    async def _publish_full(self, version: int, path: str, urls: list[str]) -> PublishResult:
        result = PublishResult(version, "")
        paused: list[str] = []
        try:
            for url in urls:
                await self._post(url, "/pause", params={"mode": "keep"})
                paused.append(url)
            for url in urls:
                try:
                    await self._post(
                        url, "/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": path}}
                    )
                    await self._post(url, "/reset_prefix_cache")
                    await self._post(url, "/update_weight_version", json={"new_version": str(version)})
                    result.reached.append(url)
                except Exception as exc:
                    result.failed[url] = str(exc)
        except Exception as exc:
            for url in urls:
                if url not in result.reached:
                    result.failed.setdefault(url, f"pause failed: {exc}")
        finally:
            for url in paused:
                try:
                    await self._post(url, "/resume")
                except Exception as exc:
                    log.error("could not resume %s: %s", url, exc)
        return result

    async def serves(self, url: str, version: int) -> bool | None:
        """Does this upstream serve `version`? LoRA: its `/v1/models` lists the version's adapter; full weights:
        its `/weight_info` says the version the trainer stamped (a restarted vLLM says neither). None when the
        upstream cannot be asked (down, restarting)."""
        try:
            if self.kind == "lora":
                return self.adapter_name(version) in await self.served_models(url)
            async with self.http.get(
                f"{url}/weight_info", headers=self.headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                if r.status != 200:
                    return None
                info = await r.json(content_type=None)
            return isinstance(info, dict) and str(info.get("weight_version")) == str(version)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def served_models(self, url: str) -> list[str]:
        async with self.http.get(
            f"{url}/v1/models", headers=self.headers, timeout=aiohttp.ClientTimeout(total=10)
        ) as r:
            r.raise_for_status()
            return [m["id"] for m in (await r.json()).get("data", [])]

    async def base_model(self) -> str | None:
        for url in self.upstreams:
            try:
                async with self.http.get(f"{url}/v1/models", headers=self.headers) as r:
                    data = (await r.json()).get("data", [])
                bases = [m["id"] for m in data if not m.get("parent")]
                if bases:
                    return bases[0]
            except Exception:
                continue
        return None

    async def logprobs_mode_warning(self) -> str | None:
        """vLLM must return processed (temperature-scaled) logprobs for the recorded behaviour logprobs
        to equal the trainer's. Dev mode exposes the engine config at ``/server_info?config_format=json``
        (``vllm_config.model_config.logprobs_mode``)."""
        for url in self.upstreams:
            try:
                async with self.http.get(
                    f"{url}/server_info", params={"config_format": "json"}, headers=self.headers
                ) as r:
                    if r.status != 200:
                        return (
                            f"cannot check --logprobs-mode on {url} (/server_info: HTTP {r.status}; it needs "
                            "VLLM_SERVER_DEV_MODE=1); start vLLM with --logprobs-mode processed_logprobs"
                        )
                    info = await r.json(content_type=None)
            except Exception as exc:
                return f"cannot check --logprobs-mode on {url}: {exc}"
            mode = None
            config = info.get("vllm_config") if isinstance(info, dict) else None
            if isinstance(config, dict):
                mode = (config.get("model_config") or {}).get("logprobs_mode")
            elif isinstance(config, str):  # older servers: the config as one string
                mode = "processed_logprobs" if "processed_logprobs" in config else None
            if mode != "processed_logprobs":
                return (
                    f"{url} runs with logprobs_mode={mode or 'unknown'}, not processed_logprobs: the recorded "
                    "logprobs are raw, so PPO ratios are off whenever temperature != 1"
                )
        return None
