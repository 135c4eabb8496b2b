"""Build the import view the type checker and the layer checker read: build/lint/trainwire/, a tree of symlinks
laid out as the package installs (trainwire/proxy -> proxy/, ...; pyproject.toml's package-dir).

mypy and import-linter find modules by walking directories, and in the checkout `trainwire.proxy` lives in
proxy/, not in trainwire/proxy/. The view costs nothing to make and always shows the working tree as it is."""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(out: Path) -> Path:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    if out.exists():
        shutil.rmtree(out)
    top = out / "trainwire"
    top.mkdir(parents=True)
    for entry in sorted((ROOT / mapping["trainwire"]).iterdir()):
        if entry.name != "__pycache__":
            os.symlink(entry, top / entry.name)
    for package, folder in mapping.items():
        if package != "trainwire":
            os.symlink(ROOT / folder, out / package.replace(".", "/"))
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "lint"))
