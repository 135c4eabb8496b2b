"""Alembic, driven from code so `trainwire migrate` works from an installed package (no alembic.ini needed)."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config


def migrations_dir() -> str:
    """The Alembic scripts, found as the package resource `trainwire.migrations` wherever it is installed."""
    return str(files("trainwire.migrations"))


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", migrations_dir())
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_head(url: str) -> None:
    command.upgrade(alembic_config(url), "head")
