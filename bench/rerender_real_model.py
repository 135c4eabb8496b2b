"""How often the real model's chat template re-renders an earlier turn otherwise than it was sampled.

Starts vLLM on the real model (make real-model) with the shipped tool template and the hermes parser, and the proxy
on SQLite; runs N sessions of the calculator agent of tests/test_real_model_vllm.py (an in-context worked tool
call, the model's own tool calls executed and sent back, one nudge to use the tool), two-digit sums, temperature 1;
then compares each call's recorded prompt with the previous call's prompt + completion
(tests/support/rerender.py) and prints the rate and the reasons as JSON. Everything it starts is stopped.

    flock /tmp/trainwire-vllm.lock python -m bench.rerender_real_model --sessions 48
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from demo.real_model import TOOL_TEMPLATE, materialize
from demo.vllm_server import start_vllm
from tests.support import dbread
from tests.support.ports import free_port
from tests.support.proxyproc import ProxyProcess
from tests.support.rerender import rerender_report
from tests.test_real_model_vllm import SERVED, agent_session, decoder
from trainwire.store.migrate import upgrade_head


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    questions = [f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?" for _ in range(args.sessions)]
    with tempfile.TemporaryDirectory(prefix="rerender-") as tmp:
        work = Path(tmp)
        db = f"sqlite+aiosqlite:///{work}/trainwire.db"
        upgrade_head(db)
        vllm = start_vllm(
            materialize(),
            free_port(),
            served_model_name=SERVED,
            log_path=work / "vllm.log",
            max_model_len=2048,
            chat_template=TOOL_TEMPLATE,
            kv_cache_gb=2,
            timeout=600,
        )
        proxy = ProxyProcess(
            ["--upstream", vllm.url, "--database-url", db, "--journal-dir", str(work / "journal")],
            log_path=work / "proxy.log",
        )
        try:
            proxy.start()
            t0 = time.monotonic()
            sids = [f"r-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(questions))]
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda a: agent_session(proxy, a[0], a[0], a[1]), zip(sids, questions)))
            elapsed = time.monotonic() - t0
            sessions = [dbread.calls(db, sid) for sid in sids]
            report = rerender_report(sessions, decoder(vllm), eos=2)
            report["calls"] = sum(len(s) for s in sessions)
            report["tool_call_turns"] = sum(
                1 for s in sessions for c in s if "<tool_call>" in (decoder(vllm)(list(c["completion_token_ids"])))
            )
            report["parsed_tool_calls"] = sum(
                1 for s in sessions for c in s if (c["response"]["choices"][0]["message"].get("tool_calls") or [])
            )
            report["seconds"] = round(elapsed, 1)
            print(json.dumps(report, indent=2))
        finally:
            proxy.stop()
            vllm.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
