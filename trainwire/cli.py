"""`trainwire` console script. Flags are generated from `Settings`, so a flag, its env variable and its
default can never disagree."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from typing import Callable

from pydantic import ValidationError

from trainwire.settings import Settings

SHARED = ["database_url", "log_level"]
PROXY = ["host", "port", "workers", "upstream", "upstream_api_key", "upstream_model", "policy_model", "model_route",
         "routes_file", "api_key", "admin_key", "upstream_timeout_s", "write_batch_size", "write_interval_ms",
         "write_queue_size", "spool_dir", "policy_poll_s", "air_invalid_tool_call", "air_tool_error", "air_truncated",
         "air_tool_error_pattern"]
TRAINER = ["upstream", "upstream_api_key", "policy_model", "model", "lora_rank", "lora_alpha", "batch_size", "lr",
           "checkpoint_dir", "publish_dir", "train_agent", "group_by_task", "group_size", "group_timeout_s", "mode",
           "gamma", "default_reward", "adv_estimator", "policy_loss", "loss_agg_mode", "clip_ratio", "kl_coef",
           "temperature", "max_staleness", "settle_s", "claim_timeout_s", "poll_s", "max_steps", "lora_grace_s",
           "tensorboard_dir", "wandb_project", "seed"]

COMMANDS: dict[str, tuple[str, list[str]]] = {
    "serve": ("Run the recording proxy", SHARED + PROXY),
    "migrate": ("Create or upgrade the database schema (Alembic upgrade head)", SHARED),
    "train": ("Run the trainer worker: claim rewarded sessions, train with verl, publish to vLLM", SHARED + TRAINER),
    "export": ("Export recorded calls as JSONL or Parquet", SHARED),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_setting(parser: argparse.ArgumentParser, name: str) -> None:
    field = Settings.model_fields[name]
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
    for command, (help_text, names) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        for name in dict.fromkeys(names):
            _add_setting(p, name)
        if command == "export":
            p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
            p.add_argument("--out", required=True, help="Output file")
            p.add_argument("--since", help="Only calls at or after this ISO time")
            p.add_argument("--until", help="Only calls before this ISO time")
            p.add_argument("--agent", action="append", help="Only this agent (repeatable)")
            p.add_argument("--task", action="append", help="Only this task id (repeatable)")
            p.add_argument("--include-eval", action="store_true", help="Include X-Trainwire-Train: false calls")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            loc = flag(str(err["loc"][0])) if err["loc"] else "settings"
            print(f"trainwire: error: {loc}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Callable[[Settings, argparse.Namespace], int | None] = HANDLERS[args.command]
    return handler(settings, args) or 0


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from trainwire.proxy.server import run

    return run(settings)


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from trainwire.store.migrate import upgrade_head

    upgrade_head(settings.resolved_database_url)
    print(f"trainwire: database at {redact(settings.resolved_database_url)} is at the latest schema")
    return 0


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from trainwire.rl.worker import run

    return run(settings)


def _export(settings: Settings, args: argparse.Namespace) -> int:
    from trainwire.store.export import run_export

    return run_export(settings, args)


def redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


HANDLERS = {"serve": _serve, "migrate": _migrate, "train": _train, "export": _export}

if __name__ == "__main__":
    raise SystemExit(main())
