"""The package as a user installs it: one `trainwire` namespace in site-packages, migrations and the dashboard
as package resources, every subpackage of the checkout in the wheel."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _packages() -> tuple[dict[str, str], set[str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return cfg["package-dir"], set(cfg["packages"])


def test_every_folder_with_python_code_is_a_listed_package():
    mapping, listed = _packages()
    found = set()
    for package, folder in mapping.items():
        for d in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            rel = d.relative_to(ROOT / folder).parts
            found.add(".".join([package, *rel]))
    assert found == listed, f"add to pyproject's packages: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_wheel_installs_one_namespace_with_its_resources(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("trainwire-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".data"))}
    assert top == {"trainwire", "bin"} or top == {"trainwire"}, top
    # From outside the checkout, with only the installed copy on the path: migrations run from the package's
    # own resources and the dashboard's files are there.
    code = ("import trainwire.store.migrate as m, trainwire.proxy.ui_routes as u, sys;"
            "m.upgrade_head('sqlite+aiosqlite:///' + sys.argv[1]);"
            "print(m.migrations_dir()); print(len(u._read('index.html')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.db")], check=True, capture_output=True,
                         text=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout
    migrations, index_bytes = out.split()
    assert Path(migrations).is_relative_to(target) and int(index_bytes) > 500
