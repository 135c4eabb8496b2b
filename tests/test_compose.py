"""The deployment files agree with the Compose specification and with trainwire itself.

No Docker engine runs where the tests run, so nothing is started here. Instead:

- every compose file (raw, and interpolated with .env.example the way Compose does) validates against the
  Compose specification's JSON schema, a pinned copy in tests/schemas (see its README);
- the stacks compose would start (profiles gpu and cpu, and gpu with compose.multigpu.yaml merged in) are
  rebuilt here from the files: each trainwire service's command is parsed by `trainwire.cli.build_parser()`
  and turned into a `Settings` together with its TRAINWIRE_* environment, exactly as `trainwire` does in
  the container; vLLM's arguments, the checkpoint mount, the upstream URLs and the dependencies are checked
  against what the trainer and the proxy need.

Why a renamed flag breaks this test: the flags compose passes are not compared with a list written here,
they are fed to the parser that `trainwire` builds from `Settings` at run time. Rename
`Settings.checkpoint_dir` to `checkpoints_dir` and the parser only knows `--checkpoints-dir`, so parsing the
trainer's `train --checkpoint-dir /checkpoints` exits with "unrecognized arguments: --checkpoint-dir"
and test_trainwire_commands_parse fails; rename `Settings.upstream` and `TRAINWIRE_UPSTREAM` no longer
names a field, so test_trainwire_env_names_settings fails (pydantic would have ignored it silently in
the container). test_a_renamed_flag_is_caught runs the same checks on a mutated service to show it.

If `docker compose` is installed (it is not on CI), test_docker_compose_config also runs the real
`docker compose config` on every stack and compares it with the model built here.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from trainwire.cli import COMMANDS, build_parser, settings_from_args  # noqa: E402
from trainwire.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "e4e1a42ce687c47e199551d1f025b1e713a4d1f9302706d3f89de9cef1d376a4"
COMPOSE_FILES = sorted(p.name for p in ROOT.glob("compose*.yaml"))
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
# What `docker compose ...` starts: (profiles, files).
STACKS = {
    "gpu": (("gpu",), ("compose.yaml",)),
    "cpu": (("cpu",), ("compose.yaml",)),
    "gpu+multigpu": (("gpu",), ("compose.yaml", "compose.multigpu.yaml")),
}
VLLM_MAX_LORA_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}  # vLLM's accepted --max-lora-rank values
TRAINWIRE_UID = "10001"


# --- reading compose files the way Compose does (the subset these files use) ---------------------------


class Tagged:
    """A value carrying Compose's `!override` or `!reset` merge tag."""

    def __init__(self, tag: str, value) -> None:
        self.tag, self.value = tag, value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(node.tag, value)


ComposeLoader.add_constructor("!override", _tagged)
ComposeLoader.add_constructor("!reset", _tagged)


def load_yaml(name: str):
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)  # noqa: S506 (SafeLoader subclass)


def untag(obj):
    """What the schema sees: the tagged values themselves."""
    if isinstance(obj, Tagged):
        return None if obj.tag == "!reset" else untag(obj.value)
    if isinstance(obj, dict):
        return {k: untag(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [untag(v) for v in obj]
    return obj


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


_VAR = re.compile(r"\$(?:(?P<esc>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


class MissingVariable(Exception):
    pass


def interpolate_str(text: str, env: dict[str, str], used: set[str] | None = None) -> str:
    def sub(m: re.Match) -> str:
        if m.group("esc"):
            return "$"
        if m.group("named"):
            name, op, arg = m.group("named"), None, None
        else:
            b = _BRACED.match(m.group("braced"))
            assert b, f"unsupported interpolation ${{{m.group('braced')}}}"
            name, op, arg = b.group("name"), b.group("op"), b.group("arg")
        if used is not None:
            used.add(name)
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op == ":?":
            if not value:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op == "?":
            if value is None:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _VAR.sub(sub, text)


def interpolate(obj, env: dict[str, str], used: set[str] | None = None):
    if isinstance(obj, Tagged):
        return Tagged(obj.tag, interpolate(obj.value, env, used))
    if isinstance(obj, dict):
        return {k: interpolate(v, env, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env, used) for v in obj]
    if isinstance(obj, str):
        return interpolate_str(obj, env, used)
    return obj


def _env_dict(value) -> dict:
    if isinstance(value, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in value)
    return dict(value or {})


def _volume_target(spec) -> str:
    if isinstance(spec, dict):
        return spec["target"]
    parts = spec.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


REPLACE = {"command", "entrypoint", "test", "profiles"}


def merge(base, over, key: str | None = None):
    """Compose's merge of an override file's service (or an `extends` child) onto a base, for the keys
    these files use: mappings merge key by key, `!override` replaces, `!reset` removes, command-like lists
    replace, volumes merge by target path, other lists append."""
    if isinstance(over, Tagged):
        return untag(copy.deepcopy(over.value))
    if key in ("environment", "labels"):
        return {**_env_dict(base), **_env_dict(over)}
    if key == "volumes" and isinstance(base, list):
        by_target = {_volume_target(v): v for v in base}
        by_target.update({_volume_target(v): v for v in over})
        return list(by_target.values())
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, Tagged) and v.tag == "!reset":
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v, k) if k in base else untag(copy.deepcopy(v))
        return out
    if isinstance(base, list) and isinstance(over, list) and key not in REPLACE:
        return base + [v for v in over if v not in base]
    return untag(copy.deepcopy(over))


def resolve_extends(services: dict, env: dict[str, str]) -> dict:
    """Services with `extends` replaced by the merged result (other services untouched, tags kept)."""
    out = {}
    for name, svc in services.items():
        ext = svc.get("extends")
        if ext:
            other = services if "file" not in ext else interpolate(load_yaml(ext["file"]), env)["services"]
            base = untag(resolve_extends({ext["service"]: other[ext["service"]]}, env)[ext["service"]])
            svc = merge(base, {k: v for k, v in svc.items() if k != "extends"})
        out[name] = svc
    return out


def load_stack(files: tuple[str, ...], profiles: tuple[str, ...] | None, env: dict[str, str]) -> dict:
    """The services `docker compose -f F1 -f F2 --profile P config` would print (all of them for
    profiles=None), interpolated with `env` and merged in file order."""
    services: dict = {}
    for f in files:
        doc = interpolate(load_yaml(f), env)
        for name, svc in resolve_extends(doc.get("services", {}), env).items():
            services[name] = merge(services[name], svc) if name in services else untag(svc)
    return {
        name: svc
        for name, svc in services.items()
        if profiles is None or not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


def all_services(files: tuple[str, ...], env: dict[str, str]) -> dict:
    return load_stack(files, None, env)


# --- the Dockerfile ---------------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        lines.append(buf + line)
        buf = ""
    stages: dict[str, list[str]] = {}
    current = None
    for line in lines:
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(1) or f"stage{len(stages)}"
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def stage_entrypoint(stage: str) -> list[str]:
    entry = [json.loads(line.split(None, 1)[1]) for line in dockerfile_stages()[stage] if line.startswith("ENTRYPOINT")]
    assert entry, f"Dockerfile stage {stage!r} has no ENTRYPOINT"
    return entry[-1]


# --- what each service is -------------------------------------------------------------------------------


def trainwire_argv(svc: dict) -> list[str] | None:
    """The trainwire arguments a service runs, or None if it does not run trainwire."""
    target = (svc.get("build") or {}).get("target")
    entry = svc.get("entrypoint")
    if entry is None and target in ("proxy", "trainer"):
        entry = stage_entrypoint(target)
    if isinstance(entry, str):
        entry = entry.split()
    if entry != ["trainwire"]:
        return None
    command = svc.get("command") or []
    return command.split() if isinstance(command, str) else list(command)


def is_vllm(svc: dict) -> bool:
    return (
        str(svc.get("image", "")).startswith("vllm/vllm-openai") or (svc.get("build") or {}).get("target") == "vllm-cpu"
    )


def trainwire_env(svc: dict) -> dict[str, str]:
    return {
        k: ("" if v is None else str(v))
        for k, v in _env_dict(svc.get("environment")).items()
        if k.startswith("TRAINWIRE_")
    }


def check_trainwire_service(name: str, svc: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Settings]:
    """Parse the service's command with trainwire's own parser and build its Settings with its environment,
    as `trainwire` does in the container. Fails the test with the parser's message on any mismatch."""
    argv = trainwire_argv(svc)
    assert argv, f"{name}: not a trainwire service"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(
                f"service {name!r}: `trainwire {' '.join(argv)}` is rejected by trainwire's CLI: "
                f"{err.getvalue().strip()}"
            )
    env = trainwire_env(svc)
    for key in env:
        field = key[len("TRAINWIRE_") :].lower()
        if field not in Settings.model_fields:
            pytest.fail(f"service {name!r}: {key} names no Settings field (pydantic would ignore it)")
        if field not in COMMANDS[args.command][1].model_fields:
            pytest.fail(f"service {name!r}: {key} is not a setting of `trainwire {args.command}`")
    for key in list(os.environ):
        if key.startswith("TRAINWIRE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        settings = settings_from_args(args)
    except Exception as exc:  # pydantic ValidationError: a value of the wrong type, a bad list
        pytest.fail(f"service {name!r}: its flags and TRAINWIRE_* environment are not valid settings: {exc}")
    return args.command, settings


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def volume_source_at(svc: dict, target: str) -> tuple[str, bool] | None:
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            if v["target"] == target:
                return v.get("source"), bool(v.get("read_only"))
        else:
            parts = v.split(":")
            if len(parts) >= 2 and parts[1] == target:
                return parts[0], len(parts) > 2 and "ro" in parts[2].split(",")
    return None


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(autouse=True)
def _no_dotenv(tmp_path, monkeypatch):
    # Settings also reads ./.env; a developer's .env must not leak into these checks.
    monkeypatch.chdir(tmp_path)


# --- schema -----------------------------------------------------------------------------------------------


def test_vendored_schema_is_the_pinned_copy():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, (
        "tests/schemas/compose-spec.json changed: update its README (origin, version, sha256) and this pin"
    )


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(name, env):
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    raw = load_yaml(name)
    for label, doc in (("raw", untag(raw)), ("interpolated with .env.example", untag(interpolate(raw, env)))):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"{name} ({label}) violates the Compose spec:\n" + "\n".join(
            f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:20]
        )


def test_every_variable_is_in_env_example(env):
    used: set[str] = set()
    for name in COMPOSE_FILES:
        interpolate(load_yaml(name), env, used)
    missing = sorted(used - set(env))
    assert not missing, f".env.example must document every variable the compose files use; missing: {missing}"


def test_required_variables_fail_loudly_without_env():
    with pytest.raises(MissingVariable, match="MODEL|POSTGRES_PASSWORD"):
        interpolate(load_yaml("compose.yaml"), {})


def test_env_example_selects_the_gpu_stack(env):
    assert env.get("COMPOSE_PROFILES") == "gpu", "`docker compose up` must start the GPU stack"


# --- trainwire commands, environment, paths ----------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_trainwire_commands_parse(stack, env, monkeypatch):
    profiles, files = STACKS[stack]
    services = load_stack(files, profiles, env)
    commands = {}
    for name, svc in services.items():
        if trainwire_argv(svc) is not None:
            command, _ = check_trainwire_service(name, svc, monkeypatch)
            commands.setdefault(command, []).append(name)
    assert sorted(commands) == ["migrate", "serve", "train"], commands
    assert len(commands["train"]) == 1, f"one trainer per stack: {commands['train']}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_trainwire_env_names_settings(name, env, monkeypatch):
    for svc_name, svc in all_services((name,), env).items():
        for key in trainwire_env(svc):
            assert key[len("TRAINWIRE_") :].lower() in Settings.model_fields, (
                f"{name}: service {svc_name!r}: {key} names no Settings field (pydantic would ignore it)"
            )


def test_a_renamed_flag_is_caught(env, monkeypatch):
    """The checks above, on a trainer whose flag no longer exists and on an env var that names nothing."""
    trainer = load_stack(("compose.yaml",), ("gpu",), env)["trainer"]
    renamed = copy.deepcopy(trainer)
    renamed["command"] = [("--checkpoints-dir" if a == "--checkpoint-dir" else a) for a in renamed["command"]]
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --checkpoints-dir"):
        check_trainwire_service("trainer", renamed, monkeypatch)
    renamed = copy.deepcopy(trainer)
    renamed["environment"]["TRAINWIRE_UPSTREAMS"] = "http://vllm:8000"
    with pytest.raises(pytest.fail.Exception, match="TRAINWIRE_UPSTREAMS names no Settings field"):
        check_trainwire_service("trainer", renamed, monkeypatch)
    wrong_type = copy.deepcopy(trainer)
    wrong_type["command"][wrong_type["command"].index("--batch-size") + 1] = "eight"
    with pytest.raises(pytest.fail.Exception, match="not valid settings"):
        check_trainwire_service("trainer", wrong_type, monkeypatch)


@pytest.mark.parametrize("stack", STACKS)
def test_vllm_serves_what_the_trainer_needs(stack, env, monkeypatch):
    profiles, files = STACKS[stack]
    services = load_stack(files, profiles, env)
    vllms = {n: s for n, s in services.items() if is_vllm(s)}
    assert vllms, "no vLLM service"
    ((trainer_name, trainer),) = [(n, s) for n, s in services.items() if (trainwire_argv(s) or [None])[0] == "train"]
    _, ts = check_trainwire_service(trainer_name, trainer, monkeypatch)
    vllm_ckpt = str(ts.publish_dir or ts.checkpoint_dir)

    mounted = volume_source_at(trainer, str(ts.checkpoint_dir))
    assert mounted, f"{trainer_name}: --checkpoint-dir {ts.checkpoint_dir} is not a mounted volume"
    source, read_only = mounted
    assert not read_only, f"{trainer_name}: the checkpoint volume must be writable"
    for name, svc in vllms.items():
        args = [str(a) for a in svc["command"]]
        assert flag_value(args, "--logprobs-mode") == "processed_logprobs", (
            f"{name}: needs --logprobs-mode processed_logprobs (the trainer compares temperature-scaled log-probs)"
        )
        assert "--enable-lora" in args, f"{name}: needs --enable-lora"
        assert "--enable-auto-tool-choice" in args and flag_value(args, "--tool-call-parser"), (
            f"{name}: without --enable-auto-tool-choice --tool-call-parser, requests with tools are a 400"
        )
        max_rank = int(flag_value(args, "--max-lora-rank") or 0)
        assert max_rank in VLLM_MAX_LORA_RANKS, f"{name}: --max-lora-rank {max_rank} is not one vLLM accepts"
        assert ts.lora_rank <= max_rank, f"{name}: --max-lora-rank {max_rank} < the trainer's LoRA rank {ts.lora_rank}"
        assert int(flag_value(args, "--max-loras") or 0) >= 2, (
            f"{name}: --max-loras must hold the new adapter beside the one in use"
        )
        assert flag_value(args, "--model") == ts.model, (
            f"{name}: serves {flag_value(args, '--model')}, trainer trains {ts.model}"
        )
        venv = {k: str(v) for k, v in _env_dict(svc.get("environment")).items()}
        assert venv.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("true", "1"), f"{name}: runtime LoRA off"
        assert venv.get("VLLM_SERVER_DEV_MODE") == "1", f"{name}: dev mode off (full-weight reloads need it)"
        assert (volume_source_at(svc, vllm_ckpt) or (None,))[0] == source, (
            f"{name}: must mount the trainer's checkpoint volume {source!r} at {vllm_ckpt} (where the trainer "
            f"tells vLLM to load from); it has {svc.get('volumes')}"
        )
        test = " ".join(map(str, (svc.get("healthcheck") or {}).get("test") or []))
        assert f":{flag_value(args, '--port')}/health" in test, f"{name}: healthcheck must hit /health"
        if str(svc.get("image", "")).startswith("vllm/vllm-openai"):
            tag = svc["image"].split(":", 1)[1] if ":" in svc["image"] else "latest"
            assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"{name}: pin the vLLM image to a release, not {tag!r}"
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert devices and all("gpu" in d["capabilities"] for d in devices), f"{name}: no GPU reserved"
        else:
            assert "deploy" not in svc, f"{name}: the CPU server must not reserve a GPU"


def test_vllm_image_is_pinned_without_env(env):
    """The pin holds also for an .env that does not set VLLM_VERSION."""
    env = {k: v for k, v in env.items() if k != "VLLM_VERSION"}
    image = load_stack(("compose.yaml",), ("gpu",), env)["vllm"]["image"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", image), image


@pytest.mark.parametrize("stack", STACKS)
def test_proxy_and_trainer_agree_on_upstreams(stack, env, monkeypatch):
    """The store keys "which version does this upstream serve" by URL: the trainer records the URLs it
    published to, the proxy looks up the URLs it routes to. They must be the same strings, and each must
    reach a vLLM service of the stack."""
    profiles, files = STACKS[stack]
    services = load_stack(files, profiles, env)
    upstreams = {}
    for name, svc in services.items():
        argv = trainwire_argv(svc)
        if argv and argv[0] in ("serve", "train"):
            _, settings = check_trainwire_service(name, svc, monkeypatch)
            upstreams[argv[0]] = settings.upstream
    assert upstreams["serve"] == upstreams["train"], upstreams
    names = {}
    for name, svc in services.items():
        if is_vllm(svc):
            names[name] = svc
            for net in (svc.get("networks") or {}).values():
                for alias in (net or {}).get("aliases", []):
                    names[alias] = svc
    for url in upstreams["serve"]:
        parts = urlsplit(url)
        assert parts.hostname in names, f"upstream {url}: no vLLM service or alias {parts.hostname!r} in {stack}"
        assert str(parts.port) == flag_value([str(a) for a in names[parts.hostname]["command"]], "--port"), url
    assert len(set(upstreams["serve"])) == len([s for s in services.values() if is_vllm(s)]), (
        "every vLLM replica must be an upstream (else the trainer does not publish to it)"
    )


@pytest.mark.parametrize("stack", STACKS)
def test_dependencies(stack, env):
    profiles, files = STACKS[stack]
    services = load_stack(files, profiles, env)
    defined = all_services(files, env)
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, spec in deps.items():
            assert dep in defined, f"{name} depends on undefined {dep}"
            if spec.get("required", True):
                assert dep in services, f"{name} requires {dep}, which profile(s) {profiles} do not start"
            cond = spec.get("condition", "service_started")
            if dep == "migrate":
                assert cond == "service_completed_successfully", f"{name}: wait for migrate to finish"
            if dep in services and is_vllm(services[dep]):
                assert cond == "service_healthy", f"{name}: wait for {dep} to be healthy"
            if dep == "postgres":
                assert cond == "service_healthy"
        argv = trainwire_argv(svc) or []
        if argv[:1] in (["serve"], ["train"]):
            assert (deps.get("migrate") or {}).get("condition") == "service_completed_successfully", name
            for v in (n for n, s in services.items() if is_vllm(s)):
                assert v in deps, f"{name} must wait for {v}"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["proxy"]
    assert (services["migrate"]["depends_on"]["postgres"]["condition"]) == "service_healthy"


def test_gpus_are_not_shared_by_default(env):
    for stack, (profiles, files) in STACKS.items():
        owners: dict[str, str] = {}
        for name, svc in load_stack(files, profiles, env).items():
            for dev in ((svc.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices", []):
                for gpu in dev.get("device_ids", []):
                    assert gpu not in owners, f"{stack}: GPU {gpu} reserved by {owners[gpu]} and {name}"
                    owners[gpu] = name


def test_non_root_volumes(env):
    """The trainer and vllm-cpu run as uid 10001 and write to named volumes that vLLM (root) may create
    first: volumes-init hands those volumes to that uid before either starts."""
    services = all_services(("compose.yaml",), env)
    init = services["volumes-init"]
    assert init["entrypoint"][:2] == ["chown", f"{TRAINWIRE_UID}:{TRAINWIRE_UID}"]
    init_sources = {volume_source_at(init, p)[0] for p in init["entrypoint"][2:]}
    for name in ("trainer", "trainer-cpu", "vllm-cpu"):
        svc = services[name]
        assert svc["depends_on"]["volumes-init"]["condition"] == "service_completed_successfully", name
        for v in svc["volumes"]:
            source = v.split(":")[0] if isinstance(v, str) else v.get("source")
            if not source.startswith((".", "/")):  # named volumes
                assert source in init_sources, f"{name}: named volume {source} is not handed to uid {TRAINWIRE_UID}"


# --- Dockerfile -------------------------------------------------------------------------------------------


def test_dockerfile_targets():
    stages = dockerfile_stages()
    for target in ("proxy", "trainer", "vllm-cpu"):
        assert target in stages, f"Dockerfile has no stage {target!r}"
        users = [line.split()[1] for line in stages[target] if line.startswith("USER")]
        assert users and users[-1] not in ("root", "0"), f"stage {target!r} must end as a non-root user"
    assert stage_entrypoint("proxy") == ["trainwire"] and stage_entrypoint("trainer") == ["trainwire"]
    assert stage_entrypoint("vllm-cpu") == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    base = " ".join(stages["base"])
    assert f"--uid {TRAINWIRE_UID}" in base and f"--gid {TRAINWIRE_UID}" in base
    proxy_build = " ".join(stages["proxy-build"])
    assert "[routes,export]" in proxy_build and "train" not in proxy_build.replace("trainwire", ""), (
        "the proxy image installs the base package with the routes and export extras only (no torch)"
    )
    trainer_build = " ".join(stages["trainer-build"])
    assert "[train]" in trainer_build and "torch==${TORCH_VERSION}" in trainer_build
    # The torch the trainer image pre-installs is the one pyproject's `train` extra pins.
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in stages["trainer-build"]
    assert '"verl==0.9.1"' in pyproject


def test_dockerignore_keeps_secrets_out():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allow-list"
    assert not any(line.lstrip("!").startswith(".env") for line in lines if line.startswith("!"))
    for package in ("trainwire/", "proxy/", "store/", "rl/", "migrations/", "pyproject.toml"):
        assert f"!{package}" in lines, f".dockerignore must let {package} in (pip install . needs it)"


# --- the real thing, where it exists ----------------------------------------------------------------------


def _docker_compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            try:
                out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out.returncode == 0 and out.stdout.strip()[:1] in "2345":
                return cmd
    return None


@pytest.mark.skipif(_docker_compose() is None, reason="docker compose v2 is not installed (no engine needed)")
@pytest.mark.parametrize("stack", STACKS)
def test_docker_compose_config(stack, env):
    """`docker compose config` needs no engine: it validates and merges like `up` would. Its result must
    be the stack this module checked."""
    profiles, files = STACKS[stack]
    cmd = [*_docker_compose(), "--project-directory", str(ROOT), "--env-file", str(ENV_EXAMPLE)]
    for f in files:
        cmd += ["-f", str(ROOT / f)]
    for p in profiles:
        cmd += ["--profile", p]
    out = subprocess.run(
        [*cmd, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(Path.home())},
    )
    assert out.returncode == 0, out.stderr
    real = json.loads(out.stdout)["services"]
    mine = load_stack(files, profiles, env)
    assert sorted(real) == sorted(mine)
    for name, svc in mine.items():
        r = real[name]
        assert [str(a) for a in r.get("command") or []] == [str(a) for a in svc.get("command") or []], name
        assert {k: v or "" for k, v in (r.get("environment") or {}).items()} == {
            k: "" if v is None else str(v) for k, v in _env_dict(svc.get("environment")).items()
        }, name
        assert sorted(v["target"] for v in r.get("volumes") or []) == sorted(
            _volume_target(v) for v in svc.get("volumes") or []
        ), name
        assert sorted(r.get("depends_on") or {}) == sorted(svc.get("depends_on") or {}), name
        real_devices = ((r.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices")
        my_devices = ((svc.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices")
        assert [d.get("device_ids") for d in real_devices or []] == [d.get("device_ids") for d in my_devices or []], (
            name
        )
