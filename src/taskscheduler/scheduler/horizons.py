"""Where the scheduler's scans start: one lower bound per scan, kept between ticks.

Each scan of the loop (the dispatch and next-due probes per priority, the ENQUEUED count and the
lost-message sweep, the stuck sweep) walks a partial index in time order from its start. Row versions
that left the index's status stay in it until vacuum removes them, and a held snapshot (a long
query, a transaction left open) stops vacuum: a scan from the start then walks every task that went
through since, and the loop slows down by the minute. So each scan starts from where the live rows
began last time (the earliest PENDING run_at, the oldest ENQUEUED published_at, the oldest STARTED
started_at), less MARGIN_SEC.

A row can commit with an older time than a bound already taken (its transaction took `now()` before
the scan and committed after; another scheduler's dispatch rolled back). A task created due now
says so at commit (`creation.NOTIFY_DUE` carries its run_at), and the bounds move back to it: a task
submitted in an application's long transaction is dispatched as soon as it commits. MARGIN_SEC
covers the usual commit delay of the rest, and every FULL_PASS_EVERY_SEC the dispatch's bounds are dropped (the sweeps'
every SWEEPS_FULL_PASS_EVERY_SEC), so a tick scans from the start: no task is left behind longer than
that, whatever its time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from taskscheduler.store.sweeps import Dispatched

MARGIN_SEC = 0.5
FULL_PASS_EVERY_SEC = 15.0
# The sweeps' full pass: a stuck or lost task found up to a minute late is still found long before
# any timeout that matters, and the full passes of the dispatch and of the sweeps, each as slow as the
# dead entries make it, then fall in different ticks.
SWEEPS_FULL_PASS_EVERY_SEC = 60.0


@dataclass
class Horizons:
    margin: timedelta = timedelta(seconds=MARGIN_SEC)
    full_pass_every_sec: float = FULL_PASS_EVERY_SEC
    sweeps_full_pass_every_sec: float = SWEEPS_FULL_PASS_EVERY_SEC
    # {priority: no PENDING/FAILED task of it is looked for with an earlier run_at}
    due: dict[int, datetime] = field(default_factory=dict)
    enqueued: datetime | None = None
    started: datetime | None = None
    full_passes: int = 0
    clock: Callable[[], float] = time.monotonic
    _full_pass_at: float = float("-inf")
    _sweeps_full_pass_at: float = float("-inf")

    def begin_tick(self) -> None:
        """Drop the bounds whose full pass is due (the first tick's are): this tick scans from the start."""
        now = self.clock()
        if now >= self._full_pass_at:
            self._full_pass_at = now + self.full_pass_every_sec
            self.full_passes += 1
            self.due = {}
        if self._sweeps_full_pass_at == float("-inf"):
            # The sweeps' bounds start empty: their first full pass is this tick's. The next ones fall
            # half a dispatch period off the dispatch's, so that two slow passes share no tick.
            self._sweeps_full_pass_at = now + self.full_pass_every_sec / 2
        elif now >= self._sweeps_full_pass_at:
            self._sweeps_full_pass_at = now + self.sweeps_full_pass_every_sec
            self.enqueued = None
            self.started = None

    def _less_margin(self, at: datetime) -> datetime:
        return at - self.margin

    def dispatched(self, items: Iterable[Dispatched]) -> None:
        """A batch was dispatched in run_at order per priority: nothing of those priorities before it is left."""
        for item in items:
            if item.priority is None or item.run_at is None:
                continue
            bound = self._less_margin(item.run_at)
            known = self.due.get(item.priority)
            if known is None or bound > known:
                self.due[item.priority] = bound

    def due_notified(self, at: datetime | None) -> None:
        """A task due at `at` committed (a NOTIFY says so), maybe behind the bounds: move them back to it.
        None (a notification without a time): drop the bounds, the next dispatch scans from the start."""
        if at is None:
            self.due = {}
            return
        bound = self._less_margin(at)
        self.due = {priority: min(known, bound) for priority, known in self.due.items()}

    def earliest_due(self, earliest: dict[int, datetime]) -> None:
        """Per priority, the earliest PENDING/FAILED run_at, or the database's now if that is earlier or
        there is none (a task created now is due now, before a later one found)."""
        for priority, at in earliest.items():
            self.due[priority] = self._less_margin(at)

    def oldest_enqueued(self, at: datetime) -> None:
        self.enqueued = self._less_margin(at)

    def oldest_started(self, at: datetime) -> None:
        self.started = self._less_margin(at)
