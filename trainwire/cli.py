"""`trainwire` console script. Each command's flags are generated from its settings group
(trainwire/settings.py) and the automatic-reward rules from their registry, so a flag, its env variable and its
default can never disagree."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import typing
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from trainwire import plugins
from trainwire.settings import (
    CompactSettings,
    JournalSettings,
    PluginSettings,
    ProxySettings,
    PruneSettings,
    SharedSettings,
    TrainerSettings,
)

# Each command takes the settings group it runs with; its flags are that group's fields.
COMMANDS: dict[str, tuple[str, type[SharedSettings]]] = {
    "serve": ("Run the recording proxy", ProxySettings),
    "migrate": ("Create or upgrade the database schema (Alembic upgrade head)", SharedSettings),
    "train": ("Run the trainer worker: claim rewarded sessions, train with verl, publish to vLLM", TrainerSettings),
    "export": ("Export recorded calls as JSONL or Parquet", SharedSettings),
    "replay-rejected": (
        "Write the rows the database refused (the journal's rejected-*.jsonl) again, after a fix",
        JournalSettings,
    ),
    "compact-calls": (
        "Re-store recorded calls as what each adds to an earlier call of its session, batch by batch; resumable",
        CompactSettings,
    ),
    "prune": (
        "Drop the bodies of old trained or skipped sessions, optionally archiving them to Parquet first",
        PruneSettings,
    ),
}
# The commands whose settings have --plugin (PluginSettings).
_PLUGIN_COMMANDS = {name for name, (_, group) in COMMANDS.items() if issubclass(group, PluginSettings)}
# Settings filled by flags of their own rather than a flag per field.
_NOT_FLAGS = {"air"}
_AIR_DEST = "air:"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_setting(parser: argparse.ArgumentParser, group: type[SharedSettings], name: str) -> None:
    field = group.model_fields[name]
    origin = typing.get_origin(field.annotation)
    args = typing.get_args(field.annotation)
    help_text = f"{field.description} (env TRAINWIRE_{name.upper()})"
    if field.annotation is bool:
        parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif field.annotation == list[str] or (origin is typing.Annotated and args and args[0] == list[str]):
        parser.add_argument(flag(name), dest=name, action="append", default=None, metavar="VALUE", help=help_text)
    else:
        parser.add_argument(flag(name), dest=name, default=None, metavar=name.split("_")[-1].upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainwire", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (help_text, group) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        for name in group.model_fields:
            if name not in _NOT_FLAGS:
                _add_setting(p, group, name)
        if issubclass(group, ProxySettings):
            _add_air_flags(p)
        if command == "export":
            p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
            p.add_argument("--out", required=True, help="Output file")
            p.add_argument("--since", help="Only calls at or after this ISO time")
            p.add_argument("--until", help="Only calls before this ISO time")
            p.add_argument("--agent", action="append", help="Only this agent (repeatable)")
            p.add_argument("--task", action="append", help="Only this task id (repeatable)")
            p.add_argument("--include-eval", action="store_true", help="Include X-Trainwire-Train: false calls")
        if command in ("compact-calls", "prune"):
            p.add_argument("--dry-run", action="store_true", help="Say what would be done; write nothing")
        if command == "compact-calls":
            p.add_argument(
                "--restart",
                action="store_true",
                help="Look at every session again, not only those with calls since the last complete run",
            )
    return parser


def _add_air_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per registered automatic-reward rule (proxy/air_rules.py)."""
    from trainwire.proxy.air_rules import RULES

    for rule in RULES.values():
        default = "off" if rule.default is None else rule.default
        parser.add_argument(
            rule.flag,
            dest=_AIR_DEST + rule.name,
            default=None,
            metavar="VALUE",
            help=f"{rule.help} (default {default}; env TRAINWIRE_AIR_{rule.name.upper()})",
        )


def settings_from_args(args: argparse.Namespace) -> SharedSettings:
    group = COMMANDS[args.command][1]
    given = {k: v for k, v in vars(args).items() if k in group.model_fields and v is not None}
    air = {k[len(_AIR_DEST) :]: v for k, v in vars(args).items() if k.startswith(_AIR_DEST) and v is not None}
    if air:
        given["air"] = air
    return group(**given)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in _PLUGIN_COMMANDS:
        # Before the parser is built: a plugin's reward rule brings its own --air-<name> flag.
        try:
            plugins.load(plugins.named(argv), command=command)
        except plugins.PluginError as exc:
            print(f"trainwire {command}: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            loc = flag(str(err["loc"][0])) if err["loc"] else "settings"
            print(f"trainwire: error: {loc}: {err['msg']}", file=sys.stderr)
        return 2
    if isinstance(settings, PluginSettings):
        try:  # what the settings name (already imported above, unless only a source the pre-scan skips names it)
            plugins.load(settings.plugin, command=args.command)
        except plugins.PluginError as exc:
            print(f"trainwire {args.command}: error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Callable[..., int | None] = HANDLERS[args.command]
    return handler(settings, args) or 0


def _serve(settings: ProxySettings, args: argparse.Namespace) -> int:
    from trainwire.proxy.server import run

    return run(settings)


def _migrate(settings: SharedSettings, args: argparse.Namespace) -> int:
    from trainwire.store.db import redact
    from trainwire.store.migrate import upgrade_head

    upgrade_head(settings.resolved_database_url)
    print(f"trainwire: database at {redact(settings.resolved_database_url)} is at the latest schema")
    return 0


def _train(settings: TrainerSettings, args: argparse.Namespace) -> int:
    from trainwire.rl.worker import run

    return run(settings)


def _export(settings: SharedSettings, args: argparse.Namespace) -> int:
    from trainwire.store.export import run_export

    return run_export(settings, args)


def _replay_rejected(settings: JournalSettings, args: argparse.Namespace) -> int:
    import asyncio

    from trainwire.store.db import make_engine
    from trainwire.store.journal import rejected_files
    from trainwire.store.rejected import replay_rejected

    if not rejected_files(settings.journal_dir):
        print(f"trainwire: no rejected rows in {settings.journal_dir}")
        return 0

    async def run() -> tuple[int, int]:
        engine = make_engine(settings.resolved_database_url)
        try:
            return await replay_rejected(engine, settings.journal_dir, say=lambda m: print(f"trainwire: {m}"))
        finally:
            await engine.dispose()

    written, refused = asyncio.run(run())
    print(
        f"trainwire: {written} rows written, {refused} still refused"
        + (f" (kept in {settings.journal_dir}/rejected-*.jsonl with the new error)" if refused else "")
    )
    return 1 if refused else 0


def _on_store(settings, work):
    """`work(engine)` on the settings' store once its schema is current; None, after one error line, when a
    Postgres store is behind (SQLite upgrades itself)."""
    import asyncio

    from trainwire.store.db import make_engine
    from trainwire.store.migrate import SchemaBehind, ensure_schema

    async def run():
        engine = make_engine(settings.resolved_database_url)
        try:
            await ensure_schema(engine, settings.resolved_database_url)
            return await work(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except SchemaBehind as exc:
        print(f"trainwire: error: {exc}", file=sys.stderr)
        return None


class StopOnSignal:
    """SIGINT / SIGTERM while a maintenance command runs (compact-calls, prune): the store's loop asks
    `requested` before each batch, so the batch in flight finishes (commits), then it stops; a second signal stops
    at once (the batch in flight rolls back). A command-line concern, so it lives here, not in the store."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller's should_stop decides
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now (the batch in flight rolls back)
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _compact_calls(settings: CompactSettings, args: argparse.Namespace) -> int:
    from trainwire.store.compact import compact_calls

    with StopOnSignal() as stop:
        report = _on_store(
            settings,
            lambda engine: compact_calls(
                engine,
                batch_sessions=settings.batch_sessions,
                max_sessions=settings.max_sessions,
                dry_run=args.dry_run,
                restart=args.restart,
                say=lambda m: print(f"trainwire compact-calls: {m}", flush=True),
                should_stop=lambda: stop.requested,
            ),
        )
    if report is None:
        return 2
    if report.interrupted or not report.complete:
        print("trainwire compact-calls: stopped; run it again to go on after the last committed batch")
        return 130 if report.interrupted else 0
    return 0


def _prune(settings: PruneSettings, args: argparse.Namespace) -> int:
    from trainwire.store.retention import prune

    if settings.older_than_days is None:
        print("trainwire: error: --older-than-days is required", file=sys.stderr)
        return 2
    days = settings.older_than_days
    with StopOnSignal() as stop:
        report = _on_store(
            settings,
            lambda engine: prune(
                engine,
                older_than_days=days,
                archive_dir=settings.archive_dir,
                batch_sessions=settings.batch_sessions,
                dry_run=args.dry_run,
                say=lambda m: print(f"trainwire prune: {m}", flush=True),
                should_stop=lambda: stop.requested,
            ),
        )
    if report is None:
        return 2
    return 130 if report.interrupted else 0


HANDLERS: dict[str, Callable[..., int | None]] = {
    "serve": _serve,
    "migrate": _migrate,
    "train": _train,
    "export": _export,
    "replay-rejected": _replay_rejected,
    "compact-calls": _compact_calls,
    "prune": _prune,
}

if __name__ == "__main__":
    raise SystemExit(main())
