"""Everything the proxy holds while it runs, built and torn down by the app's lifespan."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import aiohttp

from trainwire.proxy.admission import Admission
from trainwire.proxy.air import Air
from trainwire.proxy.otel_export import OtelExport
from trainwire.proxy.policy import PolicyState
from trainwire.proxy.tool_spans import IngestCounts
from trainwire.proxy.upstreams import UpstreamPool
from trainwire.records import CallRecord
from trainwire.settings import ProxySettings
from trainwire.store.db import make_engine, make_sessionmaker
from trainwire.store.journal import Journal
from trainwire.store.writer import BatchWriter

if TYPE_CHECKING:
    from trainwire.proxy.frozen import FrozenRoutes

log = logging.getLogger("trainwire.proxy")

_SEQ_SESSIONS = 100_000
# Seconds an idle upstream connection is kept: under the 5 s after which vLLM (uvicorn) closes it.
UPSTREAM_KEEPALIVE_S = 3.0


class ProxyState:
    # Made by start(), before the first request.
    http: aiohttp.ClientSession
    pool: UpstreamPool
    frozen: FrozenRoutes | None

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.engine = make_engine(settings.resolved_database_url)
        self.sessionmaker = make_sessionmaker(self.engine)
        self.writer = BatchWriter(
            self.engine,
            batch_size=settings.write_batch_size,
            interval_ms=settings.write_interval_ms,
            max_queue=settings.write_queue_size,
            journal=Journal(settings.journal_dir, fsync=settings.journal_fsync),
            call_deltas=settings.call_deltas,
        )
        self.air = Air(settings.air, settings.air_tool_error_pattern, self.writer, self.engine)
        self.admission = Admission(self.engine, settings.max_backlog)
        self.policy = PolicyState(self.engine, settings.upstream_model, settings.policy_poll_s)
        self.timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout_s, sock_connect=5)
        self.frozen = None
        self.otel: OtelExport | None = None  # made by start(): its threads belong to the serving process
        self.otlp_ingest = IngestCounts()  # POST /v1/traces (proxy/otlp_routes.py)
        self._seq: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._base_headers = {"content-type": "application/json"}
        if settings.upstream_api_key:
            self._base_headers["authorization"] = f"Bearer {settings.upstream_api_key}"

    async def start(self) -> None:
        self.otel = OtelExport.from_settings(self.settings)
        if self.otel is not None:
            self.otel.start()
        self.air.on_reward = self.observe_reward
        # aiohttp over httpx: measured 6x the pass-through throughput here (see README, bench/).
        # Idle connections are closed before the upstream closes them: vLLM's uvicorn drops a kept-alive connection
        # after 5 s, and a request written into one it is closing fails (forward.open_upstream retries that case).
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            auto_decompress=False,
        )
        self.pool = UpstreamPool(self.settings.upstream, self.http, self._base_headers)
        await self.writer.start()
        await self.policy.start()
        await self.admission.start()
        if self.settings.model_route or self.settings.routes_file:
            from trainwire.proxy.frozen import FrozenRoutes

            self.frozen = FrozenRoutes.from_settings(self.settings)
        await self.discover_base_model()

    async def stop(self) -> None:
        await self.admission.stop()
        await self.air.drain()
        await self.writer.stop()
        await self.policy.stop()
        if getattr(self, "http", None) is not None:
            await self.http.close()
        await self.engine.dispose()
        if self.otel is not None:
            await self.otel.stop()

    def record(self, rec: CallRecord) -> None:
        """Where every finished call goes: automatic rewards first (queued beside it), then the write queue.
        A failing rule never costs the call its record."""
        try:
            self.air.observe(rec)
        except Exception:
            log.exception("automatic rewards failed on call %s; it is recorded without them", rec.id)
        self.writer.submit(rec)
        if self.otel is not None:
            self.otel.call(rec)

    def observe_reward(self, reward) -> None:
        """A reward stored or queued (user or automatic): exported as a span when export is on."""
        if self.otel is not None:
            self.otel.reward(reward)

    def served(self, session_id: str) -> bool:
        """Whether this process has served a call of the session (among the last sessions it keeps a sequence
        for)."""
        return session_id in self._seq

    def next_seq(self, session_id: str) -> int:
        seq = self._seq.pop(session_id, -1) + 1
        self._seq[session_id] = seq
        if len(self._seq) > _SEQ_SESSIONS:
            self._seq.popitem(last=False)
        return seq

    def upstream_headers(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        headers = dict(self._base_headers)
        # Without an upstream key of our own, a client key meant for vLLM passes through, unless it is
        # the proxy's own key, which never leaves the proxy.
        if "authorization" not in headers and not self.settings.api_key:
            auth = client_headers.get("authorization")
            if auth:
                headers["authorization"] = auth
        return headers

    async def discover_base_model(self) -> None:
        """The name vLLM serves the base model under: the model in /v1/models that is not a LoRA adapter."""
        if self.policy.base_model is not None:
            return
        for upstream in self.pool.upstreams:
            try:
                models = await self.pool.models(upstream)
            except Exception as exc:  # upstream not up yet: try again on the next request
                log.info("base model not discovered from %s yet: %r", upstream.url, exc)
                continue
            bases = [m["id"] for m in models if not m.get("parent")]
            if bases:
                self.policy.base_model = bases[0]
                log.info("policy base model is %r (from %s)", bases[0], upstream.url)
                return
