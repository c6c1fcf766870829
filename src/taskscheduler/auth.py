"""API keys: `Authorization: Bearer <key>` checked against API_KEYS in constant time; refused
requests logged without flooding the log; a warning for an endpoint open to the network without keys.

Shared by the API (`api.auth.ApiKeyAuth`) and the scheduler's and workers' metrics endpoint.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)


def bearer_ok(header: str | None, keys: list[str]) -> bool:
    """Whether the `Authorization` header value carries one of `keys`.

    Every key is compared, with hmac.compare_digest, whatever the outcome: the time taken does not
    tell how much of a key matched, nor which key.
    """
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode("utf-8"))
    return ok


class RefusalLog:
    """Logs requests refused for want of a valid key: at most one line per client address every
    `interval_sec`, which says how many more that address had refused since its previous line.

    A client hammering the API with wrong keys must not flood the log (nor fill memory: at most
    `max_clients` addresses are remembered, the least recently logged forgotten first). What the
    client presented is never logged, only why it was refused.
    """

    def __init__(
        self, interval_sec: float = 60.0, *, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_sec = interval_sec
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()  # the metrics endpoint serves from several threads
        # address -> (when its last line was logged, refusals not logged since)
        self._clients: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def refused(self, client: str, reason: str, where: str) -> None:
        now = self._clock()
        with self._lock:
            last = self._clients.get(client)
            if last is not None and now - last[0] < self.interval_sec:
                self._clients[client] = (last[0], last[1] + 1)
                return
            suppressed = last[1] if last is not None else 0
            self._clients[client] = (now, 0)
            self._clients.move_to_end(client)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        more = f" ({suppressed} more refused since its last line)" if suppressed else ""
        log.warning(
            "authentication failed for %s: %s%s",
            client,
            reason,
            more,
            # The path is the client's: control characters would forge log lines.
            extra={"event": "auth_failed", "where": "".join(c if c.isprintable() else "?" for c in where[:200])},
        )


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only: `localhost` or a loopback IP address."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_open(what: str, host: str, port: int, keys: list[str]) -> bool:
    """Log one warning when `what` listens beyond loopback with no API_KEYS; whether it did."""
    if keys or is_loopback(host):
        return False
    log.warning(
        "%s listens on %s:%d, beyond this machine, and API_KEYS is empty: anyone who can reach it can use it;"
        " set API_KEYS, or bind to 127.0.0.1",
        what,
        host,
        port,
        extra={"event": "open_without_keys"},
    )
    return True
