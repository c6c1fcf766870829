"""`taskscheduler dev`: every role on one machine, as child processes, with embedded servers by default.

The children run the very commands compose runs (`taskscheduler api`, `... scheduler`,
`... worker --queues X`); only the servers differ. `run_dev` checks the port, starts (or reuses) the
servers, migrates, says where everything is, and hands the roles to the `supervisor`, which restarts
a child that dies and stops everything when one cannot be kept running. The children's output goes
to one log file per role in `<data_dir>/logs/`, so the terminal shows only what `dev` itself says:
where things are, and each child's state changes.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from taskscheduler.dev.supervisor import CONFIG_ERROR_EXIT, Supervisor, prepare_log_dir, role_children

# Where `dev` keeps the embedded servers' data and the roles' logs, unless given --data-dir.
DEFAULT_DATA_DIR = Path(".taskscheduler")

# Quicker than production so a first run shows retries and rescues in seconds, not minutes.
DEV_DEFAULTS: dict[str, str] = {
    "POLL_INTERVAL_SEC": "0.5",
    "STUCK_AFTER_SEC": "30",
    "HEARTBEAT_SEC": "2",
    "HEARTBEAT_TIMEOUT_SEC": "10",
    "ENQUEUE_TIMEOUT_SEC": "15",
    "RETRY_BACKOFF_BASE_SEC": "1",
    "RETRY_BACKOFF_MAX_SEC": "30",
}


class DevError(RuntimeError):
    """`dev` cannot start (the message says why, in one line); `exit_code` 2 for bad settings."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# In the data dir, while dev runs on embedded servers: the API's base URL, for `taskscheduler env`.
API_URL_FILE = "api_url"


def dev_api_url(data_dir: Path) -> str | None:
    """The API address that the `dev` of ``data_dir`` last announced (check it still runs first)."""
    try:
        return (data_dir / API_URL_FILE).read_text().strip() or None
    except OSError:
        return None


def dev_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """DEV_DEFAULTS, each unless the environment sets it."""
    return {name: environ.get(name, value) for name, value in DEV_DEFAULTS.items()}


def check_port_free(host: str, port: int) -> None:
    """Raise DevError if the API could not listen on host:port now, before anything is started.

    Bound as uvicorn binds (SO_REUSEADDR), so a port in TIME_WAIT is not reported as busy."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise DevError(f"API_HOST {host!r}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise DevError(
                f"the API cannot listen on {host}:{port}: {exc.strerror} (another taskscheduler dev?);"
                " choose another port with --port"
            ) from None


def _heartbeat_reader(database_url: str) -> Callable[[list[int]], set[int]]:
    from taskscheduler.store import db
    from taskscheduler.store import processes as process_store

    hostname = socket.gethostname()

    def ready_pids(pids: list[int]) -> set[int]:
        with db.transaction(database_url) as conn:
            return process_store.beating_pids(conn, hostname=hostname, pids=pids)

    return ready_pids


def run_dev(
    *, port: int, data_dir: Path, environ: Mapping[str, str], say: Callable[[str], None], verbose: bool = False
) -> int:
    """Check the port, start (or reuse) the servers, migrate, run every role until Ctrl-C, SIGTERM,
    SIGHUP or a child that cannot be kept running. Raises DevError if it cannot start."""
    from kombu.utils.url import maybe_sanitize_url
    from pydantic import ValidationError
    from sqlalchemy.engine import make_url

    from taskscheduler.config import Settings
    from taskscheduler.migrations import migrate_database

    env = dict(environ)
    env.setdefault("API_HOST", "127.0.0.1")
    check_port_free(env["API_HOST"], port)
    try:
        configured = Settings()  # the environment and .env, as every child will read them
    except ValidationError as exc:
        raise DevError(f"configuration error: {exc}", CONFIG_ERROR_EXIT) from None
    servers = None
    redact: Callable[[str], str] = lambda text: text  # noqa: E731
    if configured.database_url and configured.redis_url:
        env["DATABASE_URL"] = configured.database_url
        env["REDIS_URL"] = configured.redis_url
        shown = {
            "DATABASE_URL": make_url(configured.database_url).render_as_string(hide_password=True),
            "REDIS_URL": maybe_sanitize_url(configured.redis_url, mask="***"),
        }
        where = "from the environment"
    else:
        from taskscheduler.embedded import SECRET_FILE, mask_secret, start_embedded

        say(f"starting embedded PostgreSQL and Valkey in {data_dir}/ ...")
        servers = start_embedded(data_dir)
        env["DATABASE_URL"] = servers.database_url
        env["REDIS_URL"] = servers.redis_url
        embedded = servers

        def redact(text: str) -> str:
            return mask_secret(text, embedded)

        # The URLs carry the password: shown masked, with where to find it.
        shown = {name: redact(env[name]) for name in ("DATABASE_URL", "REDIS_URL")}
        where = f"embedded, this user only; password (***) in {data_dir / SECRET_FILE}"
    try:
        migrate_database(
            env["DATABASE_URL"],
            events_partition_sec=configured.events_partition_sec,
            events_partitions_ahead=configured.events_partitions_ahead,
        )
        settings = dev_settings(env)
        env.update(settings)
        env["API_PORT"] = str(port)
        log_dir = None if verbose else data_dir / "logs"
        children = role_children(log_dir)
        if log_dir is not None:
            prepare_log_dir(log_dir, [c.log_path.name for c in children if c.log_path is not None])
        api = f"http://{env['API_HOST']}:{port}"
        if servers is not None:
            (data_dir / API_URL_FILE).write_text(f"{api}\n")
        env_command = 'eval "$(taskscheduler env)"'
        if data_dir != DEFAULT_DATA_DIR.resolve():
            env_command = f'eval "$(taskscheduler env --data-dir {data_dir})"'
        for line in (
            f"API      {api}   Swagger UI {api}/docs",
            f"UI       {api}/ui/   the dashboard",
            f"servers  {where}:",
            f"         DATABASE_URL={shown['DATABASE_URL']}",
            f"         REDIS_URL={shown['REDIS_URL']}",
            f"for the CLI, check, psql and Flower: {env_command}",
            f"logs     {log_dir}/<role>.log" if log_dir is not None else "logs     here (--verbose)",
            "unlike production: servers embedded unless DATABASE_URL/REDIS_URL are set, API on"
            f" {env['API_HOST']}, quicker timings (override with the environment):",
            "         " + " ".join(f"{k}={v}" for k, v in settings.items()),
            "Ctrl-C stops everything",
        ):
            say(line)
        ready_pids = _heartbeat_reader(env["DATABASE_URL"])
        return Supervisor(env=env, say=say, children=children, ready_pids=ready_pids, redact=redact).run()
    finally:
        if servers is not None:
            servers.stop()
            say("embedded servers stopped")
