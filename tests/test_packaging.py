"""The package as a user installs it: one `trainwire` namespace in site-packages, migrations and the dashboard
as package resources, every subpackage of the checkout in the wheel and the sdist, and a tree every tool reads."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


FOLDERS = {
    "proxy": "trainwire.proxy",
    "store": "trainwire.store",
    "rl": "trainwire.rl",
    "migrations": "trainwire.migrations",
}


def _python_packages(top: Path, name: str) -> set[str]:
    found = set()
    for d in [top, *(p for p in top.rglob("*") if p.is_dir())]:
        if "__pycache__" not in d.parts and any(d.glob("*.py")):
            found.add(".".join([name, *d.relative_to(top).parts]))
    return found


def test_the_tree_is_laid_out_as_it_installs():
    """Each top-level folder is reached as trainwire.<folder> through a committed relative symlink, so tools that
    walk directories (mypy, import-linter, pyright, ty) and Python itself see the package where it installs."""
    for folder in FOLDERS:
        link = ROOT / "trainwire" / folder
        assert link.is_symlink() and os.readlink(link) == f"../{folder}", link
        assert link.resolve() == (ROOT / folder).resolve()


def test_wheel_and_sdist_hold_every_subpackage_as_real_files(tmp_path):
    expected = {"trainwire"} | set().union(*(_python_packages(ROOT / f, n) for f, n in FOLDERS.items()))
    # The wheel is built from the sdist, as a user's pip builds it: the sdist alone must be complete.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("trainwire-*.whl")
    (sdist,) = tmp_path.glob("trainwire-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    in_wheel = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith(".py")}
    assert expected <= in_wheel, sorted(expected - in_wheel)
    assert not {n.split("/")[0] for n in names} - {"trainwire", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1]: m for m in t.getmembers() if "/" in m.name}
    # The sdist holds each module once, as a real file where the package has it (trainwire/proxy/...): a link in
    # it would point outside the unpacked tree on a machine that has only the sdist.
    for folder in FOLDERS:
        for py in (ROOT / folder).rglob("*.py"):
            rel = "trainwire/" + py.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert rel in members and members[rel].isfile(), rel
    assert not any(m.issym() for m in members.values()), [n for n, m in members.items() if m.issym()]


def test_type_checker_outside_the_checkout_resolves_every_subpackage(tmp_path):
    """The editable install is a static path entry, not an import hook: ty, run in another project against this
    venv, resolves trainwire.store and the others (an unresolved import is an error)."""
    ty = Path(sys.executable).with_name("ty")
    user = tmp_path / "user.py"
    user.write_text(
        "from trainwire.store import db\nfrom trainwire.proxy import app\n"
        "from trainwire.rl.engine import config\nfrom trainwire.migrations import env\n"
        "x: int = db.no_such_name\n"
    )
    out = subprocess.run(
        [str(ty), "check", "--python", sys.prefix, str(user)], capture_output=True, text=True, cwd=tmp_path
    )
    assert "unresolved-import" not in out.stdout, out.stdout
    # ...and it really read the module: a name the store does not have is an error, on that line.
    assert "no_such_name" in out.stdout and "user.py:5" in out.stdout, out.stdout


def test_wheel_installs_one_namespace_with_its_resources(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheels)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("trainwire-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".data"))}
    assert top == {"trainwire", "bin"} or top == {"trainwire"}, top
    # From outside the checkout, with only the installed copy on the path: migrations run from the package's
    # own resources and the dashboard's files are there.
    code = (
        "import trainwire.store.migrate as m, trainwire.proxy.ui_routes as u, sys;"
        "m.upgrade_head('sqlite+aiosqlite:///' + sys.argv[1]);"
        "print(m.migrations_dir()); print(len(u._read('index.html')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "t.db")],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    ).stdout
    migrations, index_bytes = out.split()
    assert Path(migrations).is_relative_to(target) and int(index_bytes) > 500
