"""Shared by the fault tests and bench/faults.py: agents calling the proxy under load, and a Postgres cluster
stopped and started under them."""

from __future__ import annotations

import threading
import time

import openai

from tests.support.pgcluster import PgCluster, _bin


class Load:
    """Agents calling the proxy from threads until stopped; remembers the X-Call-Id of every 2xx answer."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.threads = url, threads
        self.acked: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        client = openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key="x",
            max_retries=0,
            timeout=30,
            default_headers={"X-Session-Id": f"load-{i}"},
        )
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="policy", messages=[{"role": "user", "content": f"call {n}"}]
                )
                raw.parse()
            except Exception:
                with self._lock:
                    self.failed += 1
                time.sleep(0.05)
                continue
            with self._lock:
                self.acked.append(raw.headers["x-call-id"])

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
