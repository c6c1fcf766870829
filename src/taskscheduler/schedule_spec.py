"""Recurring schedules: when a schedule fires, and what a tick does about the fires it finds due.
Pure: no I/O, every time is given.

Cron is cronsim's (not croniter's): cronsim follows Debian cron across DST, which is the contract. A job
at a fixed local time (`30 2 * * *`) fires once when that time is skipped by spring-forward (right
after the jump) and once when it repeats at fall-back; croniter 7 fires it twice at fall-back. A job
whose minute or hour starts with `*` (`0 * * * *`) follows the clock as it is: 23 fires on the
spring-forward day, 25 at fall-back. `every_sec` counts real seconds from its anchor, whatever the zone.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo, available_timezones

from cronsim import CronSim, CronSimError

# The aliases Vixie cron knows (but @reboot, which has no fire time); cronsim itself takes 5 fields.
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
NEXT_FIRE_TIMES = 5
# Fires one tick creates for one schedule at most; a longer catch-up goes on at the next tick.
MAX_FIRES_PER_TICK = 1000
# Misses counted one by one at most per tick; beyond, the catch-up jumps to the window (the count
# then stops there: it says "at least").
MAX_MISSES_COUNTED = 100_000


class Overlap(StrEnum):
    """What a fire does while the schedule's previous task has not finished."""

    SKIP = "skip"
    ALLOW = "allow"
    BUFFER_ONE = "buffer_one"


class SkipReason(StrEnum):
    OVERLAP = "overlap"
    MISSED = "missed"


@lru_cache(maxsize=4096)
def cron_fields(expression: str) -> str:
    """The 5-field form of `expression` (aliases expanded); ValueError naming what is wrong."""
    text = " ".join(expression.split())
    if text.startswith("@"):
        if text.lower() not in CRON_ALIASES:
            raise ValueError(f"unknown cron alias {text!r}; known: {', '.join(CRON_ALIASES)}")
        return CRON_ALIASES[text.lower()]
    if len(text.split()) != 5:
        raise ValueError("a cron expression has 5 fields: minute hour day-of-month month day-of-week")
    try:
        CronSim(text, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"invalid cron expression: {exc}") from None
    return text


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; ValueError when there is no such zone."""
    if name != "UTC" and name not in _zones():
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin or UTC")
    return ZoneInfo(name)


@dataclass(frozen=True)
class Spec:
    """When a schedule fires. `anchor` is where an `every_sec` count starts (start_at, else creation)."""

    cron: str | None
    every_sec: int | None
    timezone: str = "UTC"
    start_at: datetime | None = None
    end_at: datetime | None = None
    anchor: datetime | None = None

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every_sec is None):
            raise ValueError("give exactly one of cron and every_sec")
        if self.every_sec is not None and self.every_sec < 1:
            raise ValueError("every_sec must be at least 1")
        if self.start_at is not None and self.end_at is not None and self.end_at <= self.start_at:
            raise ValueError("end_at must be after start_at")
        if self.cron is not None:
            object.__setattr__(self, "cron", cron_fields(self.cron))
        zone(self.timezone)

    def fire_times(self, after: datetime) -> Iterator[datetime]:
        """Fire times strictly after `after`, in order, in UTC, within [start_at, end_at]."""
        start = after
        if self.start_at is not None and self.start_at > after:
            start = self.start_at - timedelta(microseconds=1)
        times = self._cron_times(start) if self.cron is not None else self._interval_times(start)
        for t in times:
            if self.end_at is not None and t > self.end_at:
                return
            yield t

    def next_fire_time(self, after: datetime) -> datetime | None:
        return next(self.fire_times(after), None)

    def next_fire_times(self, first: datetime | None, n: int = NEXT_FIRE_TIMES) -> list[datetime]:
        """`first` (a fire time) and the fire times after it: `n` at most."""
        if first is None:
            return []
        out = [first]
        for t in self.fire_times(first):
            if len(out) >= n:
                break
            out.append(t)
        return out

    def _cron_times(self, after: datetime) -> Iterator[datetime]:
        assert self.cron is not None
        # cronsim yields the first match after its start's second; a fixed-time job restarted inside
        # the repeated hour of a fall-back may yield the hour's first pass again, already behind us.
        local = after.astimezone(ZoneInfo(self.timezone)).replace(microsecond=0)
        for t in CronSim(self.cron, local):
            utc = t.astimezone(UTC)
            if utc > after:
                yield utc

    def _interval_times(self, after: datetime) -> Iterator[datetime]:
        assert self.every_sec is not None
        # The times anchor + k * step, before the anchor too (a backfill may ask for them); start_at,
        # when set, is the anchor and the first of them.
        anchor = self.start_at or self.anchor or after
        step = timedelta(seconds=self.every_sec)
        k = (after - anchor) // step + 1
        while True:
            yield anchor + k * step
            k += 1

    def count_before(self, first: datetime, cutoff: datetime) -> tuple[int, datetime | None, datetime | None]:
        """Of the fire times from `first` (a fire time) on: how many are before `cutoff`, the last of
        those, and the first one at or after `cutoff` (None: the schedule ends before)."""
        if self.every_sec is not None:
            step = timedelta(seconds=self.every_sec)
            n = max(0, -((first - cutoff) // step))  # ceil((cutoff - first) / step)
            if self.end_at is not None:
                n = min(n, (self.end_at - first) // step + 1 if self.end_at >= first else 0)
            after: datetime | None = first + n * step
            if after is not None and self.end_at is not None and after > self.end_at:
                after = None
            return n, (first + (n - 1) * step if n else None), after
        n, last = 0, None
        t: datetime | None = first
        times = self.fire_times(first)
        while t is not None and t < cutoff:
            n, last = n + 1, t
            if n >= MAX_MISSES_COUNTED:
                return n, last, self.next_fire_time(cutoff - timedelta(microseconds=1))
            t = next(times, None)
        return n, last, t


def jitter_sec(schedule_id: uuid.UUID, fire_time: datetime, jitter: float) -> float:
    """A delay in [0, jitter] for this fire, the same each time it is derived (a hash, not a draw),
    so that a fire re-derived after a crash or by another scheduler runs at the same moment."""
    if jitter <= 0:
        return 0.0
    digest = hashlib.sha256(f"{schedule_id}/{fire_time.astimezone(UTC).isoformat()}".encode()).digest()
    return jitter * int.from_bytes(digest[:8], "big") / float(2**64 - 1)


@dataclass(frozen=True)
class State:
    """A due schedule as a tick finds it."""

    next_fire_at: datetime | None
    buffered_for: datetime | None
    busy: bool  # a task of this schedule has not finished
    overlap: Overlap
    catchup_window_sec: float


@dataclass
class Plan:
    """What a tick does for one schedule: create tasks for `fires` (oldest first), keep `buffered_for`
    waiting, and look again at `next_fire_at`."""

    fires: list[datetime] = field(default_factory=list)
    buffered_for: datetime | None = None
    next_fire_at: datetime | None = None
    skipped: list[datetime] = field(default_factory=list)
    missed: int = 0
    last_missed: datetime | None = None

    @property
    def last_skip(self) -> tuple[datetime, SkipReason] | None:
        """The latest fire time not run, and why."""
        skipped = self.skipped[-1] if self.skipped else None
        if self.last_missed is not None and (skipped is None or self.last_missed > skipped):
            return self.last_missed, SkipReason.MISSED
        return (skipped, SkipReason.OVERLAP) if skipped is not None else None


def plan(spec: Spec, state: State, now: datetime, *, max_fires: int = MAX_FIRES_PER_TICK) -> Plan:
    """The fires due at `now`: those older than the catch-up window are missed; the others fire oldest
    first as the overlap policy allows (skip: one at a time; buffer_one: one more waits for the running
    task; allow: all); a fire buffered earlier comes first, once the schedule's task has finished."""
    out = Plan(buffered_for=state.buffered_for)
    busy = state.busy
    if out.buffered_for is not None and not busy:
        out.fires.append(out.buffered_for)
        out.buffered_for = None
        busy = True
    t = state.next_fire_at
    if t is not None and t <= now:
        cutoff = now - timedelta(seconds=state.catchup_window_sec)
        out.missed, out.last_missed, t = spec.count_before(t, cutoff)
    times = spec.fire_times(t) if t is not None else iter(())
    while t is not None and t <= now:
        if len(out.fires) >= max_fires:
            break  # the rest at the next tick
        if state.overlap == Overlap.ALLOW or not busy:
            out.fires.append(t)
            busy = True
        elif state.overlap == Overlap.BUFFER_ONE and out.buffered_for is None:
            out.buffered_for = t
        else:
            out.skipped.append(t)
        t = next(times, None)
    out.next_fire_at = t
    return out


def interval_anchor(created_at: datetime) -> datetime:
    """Where an `every_sec` schedule without start_at counts from: its creation, to the second."""
    return created_at.replace(microsecond=0)
