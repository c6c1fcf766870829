"""A task's own time limit, enforced around its handler in the pool process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class AttemptTimedOut(Exception):
    """The handler ran past its task's time limit."""


def _raise_timed_out(signum: int, frame: FrameType | None) -> None:
    raise AttemptTimedOut()


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with AttemptTimedOut after `seconds` (wall clock).

    A timer in the pool process itself, armed around the handler only, rather than Celery's
    per-message soft limit: one message may carry several attempts, each with its own limit, and the
    timer is disarmed before the outcome is written, so it can never abort that write. (A process
    frozen past its limit gets the signal when it resumes, still inside the handler.) A handler
    stuck in C code holding the GIL ignores it; the message's hard limit then kills the process.
    """
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_timed_out)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
