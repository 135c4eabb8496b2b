"""Does the calls table stop growing under `trainwire prune`? Postgres 15, measured cycle by cycle.

Starts a throwaway Postgres (tests/support/pgcluster.py) and, in a database made with the real migrations, runs
CYCLES cycles of a store in steady state: write SESSIONS sessions of CALLS calls each (the tool-using agent
sessions of bench/bytes_per_call.py, through the proxy's BatchWriter with --call-deltas, the default), mark them
trained, then `prune` (store/retention.py) every session of the earlier cycles, as `trainwire prune
--older-than-days` does once the trainer is done with them. After each step it reports the calls table's size on
disk (heap, TOAST, indexes: pg_relation_size, the TOAST relation's total, pg_indexes_size).

Three scenarios, each in a database of its own, with the same sessions:
- `keep`: no pruning (the table as it grows today);
- `prune+vacuum`: prune, then a plain `VACUUM calls` (what autovacuum does once enough rows are dead; not
  VACUUM FULL, which locks the table and rewrites it);
- `prune, no vacuum`: prune with autovacuum off on the table, to see what the vacuum is worth.

And `compact-calls` (store/compact.py) on one cycle's sessions written whole (--no-call-deltas): the table
after the writes, after compaction, after VACUUM, after writing as many sessions again as deltas (into the freed
space?), and after VACUUM FULL.

    python bench/retention.py                               # 5 cycles of 64 sessions x 32 calls (about 3 minutes)
    python bench/retention.py --cycles 8 --sessions 32 --calls 64
    python bench/retention.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: a view of the package there wins

from sqlalchemy import text, update  # noqa: E402

from tests.support.pgcluster import PgCluster  # noqa: E402
from trainwire.store.compact import compact_calls  # noqa: E402
from trainwire.store.db import make_engine  # noqa: E402
from trainwire.store.migrate import upgrade_head  # noqa: E402
from trainwire.store.models import Session  # noqa: E402
from trainwire.store.retention import prune  # noqa: E402

SCENARIOS = {"keep": (False, False), "prune+vacuum": (True, True), "prune, no vacuum": (True, False)}


async def table_size(url: str) -> dict:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        text(
                            "SELECT pg_total_relation_size(c.oid) AS total, pg_relation_size(c.oid) AS heap, "
                            "COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0) AS toast, "
                            "pg_indexes_size(c.oid) AS indexes, "
                            "(SELECT count(*) FROM calls) AS n_calls, "
                            "(SELECT count(*) FROM calls WHERE request IS NOT NULL) AS n_with_bodies "
                            "FROM pg_class c WHERE c.relname = 'calls'"
                        )
                    )
                )
                .mappings()
                .one()
            )
        return {k: int(v) for k, v in row.items()}
    finally:
        await engine.dispose()


async def _sql(url: str, *statements: str, autocommit: bool = False) -> None:
    engine = make_engine(url)
    try:
        if autocommit:  # VACUUM cannot run in a transaction
            async with engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                for s in statements:
                    await conn.execute(text(s))
        else:
            async with engine.begin() as conn:
                for s in statements:
                    await conn.execute(text(s))
    finally:
        await engine.dispose()


async def _trained(url: str, session_ids: list[str]) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(update(Session).where(Session.id.in_(session_ids)).values(status="trained"))
    finally:
        await engine.dispose()


def make_cycles(args) -> list[list[list[dict]]]:
    from bench.bytes_per_call import Text, make_session

    t = Text(args.seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        [
            make_session(
                t,
                calls=args.calls,
                completion_tokens=200,
                tool_result_tokens=300,
                system_tokens=400,
                start=start + timedelta(days=c, seconds=i),
            )
            for i in range(args.sessions)
        ]
        for c in range(args.cycles)
    ]


async def scenario(url: str, cycles: list[list[list[dict]]], *, do_prune: bool, vacuum: bool) -> list[dict]:
    from bench.bytes_per_call import write_sessions

    if do_prune and not vacuum:
        await _sql(url, "ALTER TABLE calls SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)")
    out = []
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for c, sessions in enumerate(cycles):
        step: dict = {"cycle": c + 1}
        await write_sessions(url, sessions, deltas=True, batch=256)
        await _trained(url, [s[0]["session_id"] for s in sessions])
        step["written"] = await table_size(url)
        if do_prune:
            engine = make_engine(url)
            try:
                t0 = time.perf_counter()
                # "now" is this cycle's day + 6 h: every session of an earlier cycle is over a day old.
                report = await prune(
                    engine,
                    older_than_days=1,
                    now=start + timedelta(days=c, hours=6),
                    batch_sessions=50,
                    say=lambda m: None,
                )
                step["prune_s"] = round(time.perf_counter() - t0, 2)
                step["pruned_sessions"] = report.sessions
            finally:
                await engine.dispose()
            step["pruned"] = await table_size(url)
            if vacuum:
                t0 = time.perf_counter()
                await _sql(url, "VACUUM calls", autocommit=True)
                step["vacuum_s"] = round(time.perf_counter() - t0, 2)
                step["vacuumed"] = await table_size(url)
        out.append(step)
    return out


async def compaction(url: str, sessions: list[list[dict]]) -> dict:
    """One cycle's sessions written whole (--no-call-deltas), then `compact-calls`, then VACUUM, then VACUUM
    FULL (which returns the space to the operating system)."""
    from bench.bytes_per_call import write_sessions

    await write_sessions(url, sessions, deltas=False, batch=256)
    out: dict = {"whole": await table_size(url)}
    engine = make_engine(url)
    try:
        t0 = time.perf_counter()
        report = await compact_calls(engine, batch_sessions=50, say=lambda m: None)
        out["compact_s"] = round(time.perf_counter() - t0, 2)
        out["rewritten"] = report.rewritten
    finally:
        await engine.dispose()
    out["compacted"] = await table_size(url)
    await _sql(url, "VACUUM calls", autocommit=True)
    out["vacuumed"] = await table_size(url)
    # The same sessions again, under new ids, stored as deltas: do they go into the space compaction freed?
    await write_sessions(
        url,
        [[{**r, "id": r["id"] + "-again", "session_id": r["session_id"] + "-again"} for r in s] for s in sessions],
        deltas=True,
        batch=256,
    )
    out["then_written_as_deltas"] = await table_size(url)
    await _sql(url, "VACUUM FULL calls", autocommit=True)
    out["vacuum_full"] = await table_size(url)
    return out


async def measure(cluster, args) -> dict:
    cycles = make_cycles(args)
    results: dict = {"shape": vars(args), "scenarios": {}}
    url = cluster.create_database("bench_compact")
    await asyncio.to_thread(upgrade_head, url)
    results["compaction"] = await compaction(url, cycles[0])
    for name, (do_prune, vacuum) in SCENARIOS.items():
        url = cluster.create_database("bench_" + name.replace(" ", "_").replace(",", "").replace("+", "_"))
        await asyncio.to_thread(upgrade_head, url)
        results["scenarios"][name] = await scenario(url, cycles, do_prune=do_prune, vacuum=vacuum)
    return results


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def report(r: dict) -> str:
    s = r["shape"]
    lines = [
        f"calls table (MB: total = heap + TOAST + indexes) after each cycle of {s['sessions']} sessions x "
        f"{s['calls']} calls ({s['sessions'] * s['calls']} calls a cycle), Postgres 15",
        "",
        "| scenario | cycle | calls (with bodies) | total | heap | TOAST | indexes | prune s | vacuum s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, steps in r["scenarios"].items():
        for st in steps:
            end = st.get("vacuumed") or st.get("pruned") or st["written"]
            lines.append(
                f"| {name} | {st['cycle']} | {end['n_calls']} ({end['n_with_bodies']}) | "
                f"{_mb(end['total'])} | {_mb(end['heap'])} | {_mb(end['toast'])} | {_mb(end['indexes'])} | "
                f"{st.get('prune_s', '')} | {st.get('vacuum_s', '')} |"
            )
    c = r.get("compaction")
    if c:
        lines += [
            "",
            f"compact-calls on one cycle's sessions written whole ({c['rewritten']} rows rewritten in "
            f"{c['compact_s']} s), calls table MB:",
            "",
            "| step | calls | total | heap | TOAST | indexes |",
            "|---|---|---|---|---|---|",
        ]
        for step in ("whole", "compacted", "vacuumed", "then_written_as_deltas", "vacuum_full"):
            z = c[step]
            lines.append(
                f"| {step.replace('_', ' ')} | {z['n_calls']} | {_mb(z['total'])} | {_mb(z['heap'])} | "
                f"{_mb(z['toast'])} | {_mb(z['indexes'])} |"
            )
    lines.append("")
    lines.append(
        "peak (right after each cycle's writes, before its prune), MB: "
        + "; ".join(
            f"{name}: " + ", ".join(_mb(st["written"]["total"]) for st in steps)
            for name, steps in r["scenarios"].items()
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--sessions", type=int, default=64, help="sessions written per cycle")
    p.add_argument("--calls", type=int, default=32, help="calls per session")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with PgCluster() as cluster:
        result = asyncio.run(measure(cluster, args))
    print(json.dumps(result, indent=2, default=str) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
