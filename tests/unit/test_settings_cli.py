"""Settings come in groups; each command's flags are its group's fields, and the automatic-reward rules make
their own flags from their registry."""

from __future__ import annotations

import pytest

from trainwire import cli
from trainwire.proxy.air_rules import RULES
from trainwire.settings import ProxySettings, SharedSettings, TrainerSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    for key in list(__import__("os").environ):
        if key.startswith("TRAINWIRE_"):
            monkeypatch.delenv(key)


def _flags(command: str) -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt for a in sub._actions for opt in a.option_strings if opt.startswith("--")}


def test_each_command_has_its_groups_flags_only():
    serve, train, migrate = _flags("serve"), _flags("train"), _flags("migrate")
    assert {"--database-url", "--upstream", "--port", "--write-batch-size", "--admin-key"} <= serve
    assert {"--database-url", "--upstream", "--lora-rank", "--checkpoint-dir"} <= train
    assert "--lora-rank" not in serve and "--port" not in train
    assert migrate == {"--database-url", "--log-level", "--help"}
    for group, command in ((ProxySettings, "serve"), (TrainerSettings, "train"), (SharedSettings, "migrate")):
        expected = {cli.flag(name) for name in group.model_fields if name != "air"}
        assert expected <= _flags(command)


def test_every_registered_rule_has_a_serve_flag():
    assert {r.flag for r in RULES.values()} <= _flags("serve")
    assert {"--air-invalid-tool-call", "--air-tool-error", "--air-truncated"} <= {r.flag for r in RULES.values()}


def test_rule_flags_and_env_fill_the_air_setting(monkeypatch):
    monkeypatch.setenv("TRAINWIRE_AIR_TOOL_ERROR", "-1")
    monkeypatch.setenv("TRAINWIRE_AIR_TRUNCATED", "-3")
    args = cli.build_parser().parse_args(["serve", "--air-truncated", "off", "--port", "9"])
    settings = cli.settings_from_args(args)
    assert isinstance(settings, ProxySettings) and settings.port == 9
    assert settings.air == {"truncated": "off", "tool_error": "-1"}  # the flag wins over the environment


def test_declared_air_fields_are_not_taken_for_rules(monkeypatch):
    monkeypatch.setenv("TRAINWIRE_AIR_TOOL_ERROR_PATTERN", "FAILED,oops")
    s = ProxySettings()
    assert s.air == {} and s.air_tool_error_pattern == ["FAILED", "oops"]


def test_lists_from_env_and_bad_values(monkeypatch, capsys):
    monkeypatch.setenv("TRAINWIRE_UPSTREAM", "http://a:1/, http://b:2")
    assert TrainerSettings().upstream == ["http://a:1", "http://b:2"]
    assert cli.main(["train", "--lora-rank", "many"]) == 2
    assert "--lora-rank" in capsys.readouterr().err
