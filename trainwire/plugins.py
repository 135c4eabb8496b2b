"""`--plugin MODULE` (repeatable) on `trainwire serve` and `trainwire train`: user code imported before any
registry is read, so that it can register a policy loss or an advantage estimator (verl's registries,
rl/advantages.py) or an automatic-reward rule (`@rule`, proxy/air_rules.py).

Where it is imported: by `trainwire.cli.main` before the command line is parsed (a plugin's reward rule then has
its `--air-<name>` flag; the modules named by `--plugin` in argv, `TRAINWIRE_PLUGIN` and `.env` are imported
first), so on every torchrun rank, which each run `main`; and by every `serve --workers N` process before it
builds the app (proxy/workers.py). MODULE is a module name on the Python path (`my_rules`, `pkg.rules`) or the
path of a `.py` file. A module that cannot be imported stops the command with one line and exit code 2.

A plugin used by both commands can keep each side's imports to that side with `loading_for("train")` and
`loading_for("serve")` (verl and torch take seconds to import, and a proxy has no use for them).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType

ENV = "TRAINWIRE_PLUGIN"
FLAG = "--plugin"

_command: str | None = None


class PluginError(Exception):
    """A plugin module could not be imported; the message is one line naming it and why."""


def loading_for(command: str) -> bool:
    """Whether the plugins are being imported for `command` ("serve" or "train"). True outside the CLI (a test or
    a notebook importing a plugin), so that it registers everything there."""
    return _command is None or _command == command


def load(names: Iterable[str], command: str | None = None) -> list[ModuleType]:
    """Import each plugin once (importing one again is a no-op), in order."""
    global _command
    if command is not None:
        _command = command
    return [_import(name) for name in names]


def _import(name: str) -> ModuleType:
    try:
        if name.endswith(".py") or os.sep in name:
            return _import_file(Path(name))
        return importlib.import_module(name)
    except PluginError:
        raise
    except Exception as exc:  # ImportError, or whatever the module raised while it ran
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise PluginError(f"{FLAG} {name}: cannot import it: {type(exc).__name__}: {first}") from exc


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"{FLAG} {path}: no such file")
    key = f"trainwire_plugin_{path.resolve().stem}"
    loaded = sys.modules.get(key)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{FLAG} {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # before running it, as `import` does (dataclasses and pickling look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module


def named(argv: Sequence[str], environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> list[str]:
    """The plugins a command line names before it is parsed: `--plugin X` / `--plugin=X` in argv, else
    `TRAINWIRE_PLUGIN` from the environment or the `.env` file (comma-separated), as the settings would read
    them (trainwire/settings.py: a flag wins over the environment, which wins over `.env`)."""
    given: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == FLAG and i + 1 < len(argv):
            given.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(FLAG + "="):
            given.append(arg[len(FLAG) + 1 :])
        i += 1
    if given:
        return given
    value = (os.environ if environ is None else environ).get(ENV)
    if value is None and env_file and Path(env_file).is_file():
        from dotenv import dotenv_values

        value = dotenv_values(env_file).get(ENV)
    from trainwire.settings import _split_list

    return list(_split_list(value or ""))
