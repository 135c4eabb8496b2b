"""trainwire/plugins.py and `--plugin` on the command line: what is imported, when, and the one-line error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trainwire import cli, plugins
from trainwire.proxy.air_rules import RULES

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin_example.py"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["serve", "--plugin", "a", "--port", "1", "--plugin=b.c"], {}, ["a", "b.c"]),
        (["train", "--max-steps", "1"], {"TRAINWIRE_PLUGIN": "x, y"}, ["x", "y"]),
        (["train"], {"TRAINWIRE_PLUGIN": '["x.py"]'}, ["x.py"]),
        (["train", "--plugin", "flag"], {"TRAINWIRE_PLUGIN": "env"}, ["flag"]),  # a flag wins over the environment
        (["serve"], {}, []),
    ],
)
def test_named_before_parsing(argv, env, expected):
    assert plugins.named(argv, env, env_file=None) == expected


@pytest.fixture(autouse=True)
def _command_restored(monkeypatch):
    monkeypatch.setattr(plugins, "_command", None)  # main sets it to the command it runs


def test_a_module_that_cannot_be_imported_is_one_line_and_exit_2(capsys):
    assert cli.main(["serve", "--plugin", "no_such_plugin_module"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "trainwire serve: error: --plugin no_such_plugin_module: cannot import it: ModuleNotFoundError: "
        "No module named 'no_such_plugin_module'"
    ]


def test_a_plugin_that_raises_and_a_missing_file_are_named(tmp_path, capsys):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('needs FOO set\\nsecond line')\n")
    assert cli.main(["train", "--plugin", str(broken)]) == 2
    assert cli.main(["train", "--plugin", str(tmp_path / "absent.py")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"trainwire train: error: --plugin {broken}: cannot import it: RuntimeError: needs FOO set",
        f"trainwire train: error: --plugin {tmp_path / 'absent.py'}: no such file",
    ]


@pytest.fixture
def own_rule(tmp_path):
    path = tmp_path / "rule_plugin.py"
    path.write_text(
        "from trainwire.proxy.air_rules import rule\n"
        "@rule('plugin_probe_rule', default=None, help='a test rule')\n"
        "def judge(air, rec):\n"
        "    return []\n"
    )
    yield path
    RULES.pop("plugin_probe_rule", None)
    sys.modules.pop("trainwire_plugin_rule_plugin", None)


def test_a_plugin_rule_has_its_flag_on_the_command_line(own_rule, monkeypatch):
    """The plugin is imported before the parser is built, so --air-plugin-probe-rule parses into the settings."""
    seen = {}
    monkeypatch.setitem(cli.HANDLERS, "serve", lambda settings, args: seen.setdefault("s", settings) and 0)
    assert cli.main(["serve", "--plugin", str(own_rule), "--air-plugin-probe-rule", "-0.5"]) == 0
    assert "plugin_probe_rule" in RULES
    assert seen["s"].plugin == [str(own_rule)] and seen["s"].air == {"plugin_probe_rule": "-0.5"}
    # Imported once: naming it again (the workers do) registers nothing twice.
    plugins.load([str(own_rule)])


def test_the_example_registers_its_loss_estimator_and_rule():
    """examples/plugin_example.py as both commands see it (outside the CLI it registers everything)."""
    from trainwire.rl.advantages import advantage_estimator_names, compute_advantages, policy_loss_names

    try:
        plugins.load([str(EXAMPLE)])
        assert "truncated_pg" in policy_loss_names() and "group_sign" in advantage_estimator_names()
        assert "empty_answer" in RULES and RULES["empty_answer"].default is None
        signs = compute_advantages([1.0, 0.0, 0.5, 3.0], ["a", "a", "a", "b"], estimator="group_sign")
        assert signs == [1.0, -1.0, 0.0, 1.0]
    finally:
        RULES.pop("empty_answer", None)
