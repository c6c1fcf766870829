"""The message slice: after MESSAGE_SLICE_SEC a message's attempts not yet started go back to the
queue, so that one slow attempt does not hold up the others while other pool processes are idle."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from taskscheduler.broker import Attempt
from taskscheduler.worker.threads import ProcessThread

log = logging.getLogger(__name__)


class MessageSlice:
    """The attempts of one message, shared by the loop that runs them and the slicer that hands the
    rest off once the slice has passed.

    Under one lock the loop takes the next attempt or the slicer takes all those left, so no attempt
    is both run here and sent back (were it both, its claim would still let only one run it). The
    first attempt is never handed off: a message always gets something done.
    """

    def __init__(
        self, items: Sequence[Attempt], *, deadline: float, send_back: Callable[[Sequence[Attempt]], None]
    ) -> None:
        self.items = items
        self.deadline = deadline
        self._send_back = send_back
        self._next = 0
        self._open = True
        self._lock = threading.Lock()
        self._settled = threading.Event()  # no hand-off under way
        self._settled.set()

    def take(self) -> Attempt | None:
        """The next attempt to run, or None when none is left here."""
        if self._next and time.monotonic() >= self.deadline:
            self.hand_off()  # the slicer is late (a busy process): do not start another one
        with self._lock:
            if not self._open or self._next >= len(self.items):
                return None
            self._next += 1
            return self.items[self._next - 1]

    def hand_off(self) -> None:
        """Send the attempts not yet taken back to the queue, if any, once."""
        with self._lock:
            if not self._open or not 0 < self._next < len(self.items):
                return
            self._open = False
            self._settled.clear()
            rest = self.items[self._next :]
        try:
            self._send_back(rest)
        except Exception as exc:  # the broker may be away; they stay ENQUEUED and the sweep republishes them
            log.warning("could not send %d attempts back to the queue: %s", len(rest), exc)
        finally:
            self._settled.set()

    def close(self) -> None:
        """No hand-off after this one; waits for one under way, so that none outlives the message."""
        with self._lock:
            self._open = False
        self._settled.wait()


class Slicer(ProcessThread):
    """Hands off the rest of each message whose slice has passed, from one background thread per
    process (started on first use, after the pool's fork), even while the message's current
    attempt runs in the main thread.

    A thread rather than a signal: SIGALRM is the handler's time limit (see `limits`). It publishes
    through Celery's producer pool, which gives each thread a producer and connection of its own.
    """

    thread_name = "message-slicer"

    def __init__(self) -> None:
        super().__init__()
        self._watched: list[MessageSlice] = []
        self._changed = threading.Condition()

    @contextmanager
    def watching(self, message: MessageSlice) -> Iterator[None]:
        """Hand off the rest of `message` at its deadline while the block runs."""
        self._ensure_thread()
        with self._changed:
            self._watched.append(message)
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                if message in self._watched:
                    self._watched.remove(message)
            message.close()

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [message for message in self._watched if message.deadline <= now]
                if not due:
                    next_deadline = min((message.deadline for message in self._watched), default=None)
                    self._changed.wait(None if next_deadline is None else next_deadline - now)
                    continue
                for message in due:
                    self._watched.remove(message)
            for message in due:
                message.hand_off()


_slicer: Slicer | None = None


def process_slicer() -> Slicer:
    """This process's Slicer."""
    global _slicer
    if _slicer is None:
        _slicer = Slicer()
    return _slicer
