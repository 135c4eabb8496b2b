"""Shared by the fault tests and bench/faults.py: agents calling the proxy under load, and a Postgres cluster
stopped and started under them."""

from __future__ import annotations

import threading
import time
import uuid

import openai

from tests.support.pgcluster import PgCluster, _bin

# Every generation route, streamed and not: (route, stream).
EVERY_ROUTE = tuple((r, s) for r in ("chat", "completions", "responses", "messages") for s in (False, True))


def _call(clients, route: str, stream: bool, n: int) -> str:
    """One call through a real client library; returns its X-Call-Id once the client has the whole answer (for a
    stream: has read it to its end, the event that ends it included)."""
    openai_client, anthropic_client = clients
    text = f"call {n}"
    if route == "chat":
        raw = openai_client.chat.completions.with_raw_response.create(
            model="policy", messages=[{"role": "user", "content": text}], stream=stream
        )
    elif route == "completions":
        raw = openai_client.completions.with_raw_response.create(model="policy", prompt=text, stream=stream)
    elif route == "responses":
        raw = openai_client.responses.with_raw_response.create(model="policy", input=text, stream=stream)
    else:
        raw = anthropic_client.messages.with_raw_response.create(
            model="policy", max_tokens=32, messages=[{"role": "user", "content": text}], stream=stream
        )
    parsed = raw.parse()
    if stream:
        ends = 0
        for event in parsed:
            kind = getattr(event, "type", None)
            ends += kind in ("response.completed", "message_stop")
        if route in ("responses", "messages") and not ends:
            raise RuntimeError(f"{route} stream ended without its closing event")
    return raw.headers["x-call-id"]


class Load:
    """Agents calling the proxy from threads until stopped; remembers the X-Call-Id of every 2xx answer. Thread i
    calls `routes[i % len(routes)]` ((route, stream) pairs; chat, not streamed, by default)."""

    def __init__(self, url: str, threads: int = 4, routes=(("chat", False),)) -> None:
        self.url, self.threads, self.routes = url, threads, tuple(routes)
        self.acked: list[str] = []
        self.by_route: dict[str, list[str]] = {}
        self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        import anthropic

        headers = {"X-Session-Id": f"load-{i}-{uuid.uuid4().hex[:8]}"}
        clients = (
            openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=30, default_headers=headers),
            anthropic.Anthropic(base_url=self.url, api_key="x", max_retries=0, timeout=30, default_headers=headers),
        )
        route, stream = self.routes[i % len(self.routes)]
        label = f"{route}{' stream' if stream else ''}"
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                call_id = _call(clients, route, stream, n)
            except Exception:
                with self._lock:
                    self.failed += 1
                time.sleep(0.05)
                continue
            with self._lock:
                self.acked.append(call_id)
                self.by_route.setdefault(label, []).append(call_id)

    def __enter__(self) -> "Load":
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(30)


def stop_pg(pg: PgCluster) -> None:
    pg._run(_bin("pg_ctl"), "-D", str(pg.data), "-m", "fast", "stop")


def start_pg(pg: PgCluster) -> None:
    opts = f"-p {pg.port} -k {pg.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    pg._run(_bin("pg_ctl"), "-D", str(pg.data), "-o", opts, "-l", str(pg.dir / "log"), "-w", "start")
