"""Serving the API with uvicorn, bounded against clients that hold connections without using them.

uvicorn (0.55) arms no timer on a connection until it has answered a request: a client that
connects and sends nothing, or half a request line, keeps its connection (and a file descriptor)
for ever, and `limit_concurrency` only turns the requests beyond it into 503s, it accepts the
connections all the same. At the file-descriptor limit, asyncio's accept loop then logs an
`EMFILE` traceback for every pending connection on every loop iteration. So `taskscheduler api`:

- closes a connection that has not sent its whole request (head and body) within
  API_REQUEST_TIMEOUT_SEC of opening it, or of its first byte after a keep-alive pause;
- keeps at most API_MAX_CONNECTIONS connections, fewer when the file-descriptor limit asks for it:
  a connection beyond the cap closes the oldest connection that has no request in progress, or,
  when every connection is serving a request, is answered 503 and closed. Evicting the oldest idle
  one, rather than refusing the newcomer, keeps a probe such as /healthz answering while idle
  connections pile up;
- raises its soft RLIMIT_NOFILE to the hard limit at start-up;
- lets through at most one line per THROTTLE_SEC of each repeated warning (asyncio's accept
  errors, uvicorn's bad-request warnings, ours), with a count of those left out.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from taskscheduler.config import Settings

log = logging.getLogger(__name__)

# The listen queue, and the most connections asyncio accepts in one loop iteration (it passes the
# backlog as that bound), so the most by which the open connections can overshoot the cap before
# the protocol sees them. uvicorn's default, 2048, would need that many spare descriptors.
BACKLOG = 256
# Descriptors the process needs besides its HTTP connections: the listening socket, logs, the
# epoll instance, Redis for /readyz, imported modules' files; the database pools are added to it.
FD_RESERVE = 64
THROTTLE_SEC = 10.0

_REFUSAL_BODY = b'{"detail":"too many open connections, try again"}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)


class Throttle(logging.Filter):
    """Passes the first record of each kind (logger and first line of its message template), then
    none of that kind for `interval_sec`; the next one that passes says how many were left out."""

    def __init__(self, interval_sec: float = THROTTLE_SEC) -> None:
        super().__init__()
        self.interval_sec = interval_sec
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg).split("\n", 1)[0])
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_sec:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            # Appended to the formatted message, not to the template: the template may hold %.
            record.msg = record.getMessage() + f" ({suppressed} more like this left out of the log)"
            record.args = None
        return True


def throttle(*logger_names: str, interval_sec: float = THROTTLE_SEC) -> None:
    """Attach a Throttle to each logger (once)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Throttle) for f in logger.filters):
            logger.addFilter(Throttle(interval_sec))


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # a sandbox may refuse; the cap below then uses the old limit
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """API_MAX_CONNECTIONS, lowered so that the connections, the accept overshoot, both database
    pools and the rest fit under the file-descriptor limit."""
    pools = settings.db_pool_size + settings.db_max_overflow + settings.db_pool_size  # engine + statement pool
    room = fd_limit - BACKLOG - pools - FD_RESERVE
    return max(1, min(settings.api_max_connections, room))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request and a cap on connections.
    Configured by subclassing (see `guarded_protocol`): uvicorn builds the protocol itself."""

    request_timeout_sec: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 1000
    # The open connections in the order they were opened (a dict as an ordered set), per subclass.
    opened: ClassVar[dict[GuardedH11Protocol, None]] = {}

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._request_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.opened) >= self.max_connections and not self._evict_idle():
            log.warning("%d connections open, all serving a request: refusing new ones", len(self.opened))
            transport.write(_REFUSAL)
            transport.close()
            return
        self.opened[self] = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.opened.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()
        # Between requests uvicorn's keep-alive timer watches the connection; a pipelined request
        # already buffered may have started meanwhile.
        if self.timeout_keep_alive_task is None:
            self._follow_request()

    def _follow_request(self) -> None:
        """Keep the deadline while the client still owes bytes of its request; drop it once the
        request is in."""
        if self.transport.is_closing():
            return
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            if self._request_timer is None:
                self._arm()
        else:
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._request_timer = self.loop.call_later(self.request_timeout_sec, self._request_timed_out)

    def _disarm(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if not self.transport.is_closing():
            log.info("closing connections that sent no complete request within %gs", self.request_timeout_sec)
            # connection_lost tells a request waiting for its body that the client is gone.
            self.transport.close()

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _evict_idle(self) -> bool:
        """Close the oldest connection with no request in progress; False if there is none."""
        for other in self.opened:
            if not other._busy() and not other.transport.is_closing():
                log.warning("%d connections open: closing the oldest idle ones", len(self.opened))
                self.opened.pop(other)
                other._disarm()
                other.transport.close()
                return True
        return False


def guarded_protocol(request_timeout_sec: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class with these limits, and a connection registry of its own."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"request_timeout_sec": request_timeout_sec, "max_connections": max_connections, "opened": {}},
    )


def serve(app: Any, settings: Settings, *, host: str, port: int) -> None:
    """Run `app` with uvicorn, with the limits above, until a signal stops it."""
    fd_limit = raise_fd_limit()
    cap = connection_cap(settings, fd_limit)
    if cap < settings.api_max_connections:
        log.warning("open-files limit %d: at most %d connections (API_MAX_CONNECTIONS %d)",
                    fd_limit, cap, settings.api_max_connections)  # fmt: skip
    throttle("asyncio", "uvicorn.error", __name__, "taskscheduler.api.app")
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=guarded_protocol(settings.api_request_timeout_sec, cap),
        backlog=BACKLOG,
        log_config=None,
        access_log=False,
    )
