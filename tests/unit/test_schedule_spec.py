"""Fire times and the tick's plan, without a database: DST, intervals, aliases, validation, the
catch-up window and the overlap policies."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from taskscheduler.schedule_spec import Overlap, Spec, State, cron_fields, jitter_sec, plan, zone

BERLIN = ZoneInfo("Europe/Berlin")
# 2025 in Berlin: spring-forward on March 30 (02:00 -> 03:00), fall-back on October 26 (03:00 -> 02:00).
SPRING = datetime(2025, 3, 30, tzinfo=BERLIN)
FALL = datetime(2025, 10, 26, tzinfo=BERLIN)


def fires_on(spec: Spec, day: datetime) -> list[datetime]:
    """The fire times during the local calendar day that starts at `day`, as local times."""
    end = (day + timedelta(days=1, hours=2)).replace(hour=0)
    out = []
    for t in spec.fire_times(day.astimezone(UTC) - timedelta(microseconds=1)):
        if t >= end.astimezone(UTC):
            break
        out.append(t.astimezone(BERLIN))
    return out


def test_a_fixed_time_skipped_by_spring_forward_fires_once_right_after_the_jump():
    spec = Spec(cron="30 2 * * *", every_sec=None, timezone="Europe/Berlin")
    (fire,) = fires_on(spec, SPRING)
    assert fire.isoformat() == "2025-03-30T03:00:00+02:00"
    assert [t.isoformat() for t in fires_on(spec, SPRING - timedelta(days=1))] == ["2025-03-29T02:30:00+01:00"]
    assert [t.isoformat() for t in fires_on(spec, SPRING + timedelta(days=1))] == ["2025-03-31T02:30:00+02:00"]


def test_a_fixed_time_repeated_by_fall_back_fires_once():
    spec = Spec(cron="30 2 * * *", every_sec=None, timezone="Europe/Berlin")
    assert [t.isoformat() for t in fires_on(spec, FALL)] == ["2025-10-26T02:30:00+02:00"]
    # Also when the schedule is looked at from inside the repeated hour (its second pass).
    inside = datetime(2025, 10, 26, 1, 0, tzinfo=UTC)  # 02:00 CET, the second 02:00
    assert spec.next_fire_time(inside) == datetime(2025, 10, 27, 1, 30, tzinfo=UTC)


def test_hourly_across_fall_back_fires_25_times_and_23_at_spring_forward():
    spec = Spec(cron="0 * * * *", every_sec=None, timezone="Europe/Berlin")
    fall = fires_on(spec, FALL)
    assert len(fall) == 25
    utc = [t.astimezone(UTC) for t in fall]
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(utc))
    assert len(fires_on(spec, SPRING)) == 23


def test_every_sec_is_exact_in_utc_whatever_the_zone():
    anchor = datetime(2025, 10, 25, 22, 0, tzinfo=UTC)
    spec = Spec(cron=None, every_sec=3600, timezone="Europe/Berlin", anchor=anchor)
    times = spec.next_fire_times(spec.next_fire_time(anchor), 30)
    assert times[0] == anchor + timedelta(hours=1)
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(times))


def test_every_sec_counts_from_start_at():
    start = datetime(2025, 1, 1, 0, 0, 5, tzinfo=UTC)
    spec = Spec(cron=None, every_sec=10, start_at=start, anchor=datetime(2024, 1, 1, tzinfo=UTC))
    assert spec.next_fire_times(spec.next_fire_time(start - timedelta(days=1)), 3) == [
        start,
        start + timedelta(seconds=10),
        start + timedelta(seconds=20),
    ]


def test_start_and_end_bound_the_fire_times():
    start = datetime(2025, 1, 1, 10, 0, tzinfo=UTC)
    spec = Spec(cron="0 * * * *", every_sec=None, start_at=start, end_at=start + timedelta(hours=2))
    assert list(spec.fire_times(start - timedelta(days=3))) == [start + timedelta(hours=h) for h in range(3)]


@pytest.mark.parametrize(
    ("alias", "fields"),
    [("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@weekly", "0 0 * * 0"),
     ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@HOURLY", "0 * * * *")],
)  # fmt: skip
def test_cron_aliases(alias, fields):
    assert cron_fields(alias) == fields


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", "invalid cron"),
        ("* * *", "5 fields"),
        ("0 0 * * * *", "5 fields"),
        ("@reboot", "unknown cron alias"),
        ("0 0 31 2 *", "invalid cron"),
        ("", "5 fields"),
    ],
)
def test_bad_cron_expressions_say_what_is_wrong(expression, message):
    with pytest.raises(ValueError, match=message):
        cron_fields(expression)


def test_spec_validation():
    with pytest.raises(ValueError, match="exactly one"):
        Spec(cron="* * * * *", every_sec=5)
    with pytest.raises(ValueError, match="exactly one"):
        Spec(cron=None, every_sec=None)
    with pytest.raises(ValueError, match="at least 1"):
        Spec(cron=None, every_sec=0)
    t = datetime(2025, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="after start_at"):
        Spec(cron=None, every_sec=5, start_at=t, end_at=t)
    with pytest.raises(ValueError, match="unknown time zone"):
        zone("Mars/Olympus")
    with pytest.raises(ValueError, match="unknown time zone"):
        Spec(cron="* * * * *", every_sec=None, timezone="../../etc/passwd")


def test_jitter_is_within_its_bound_and_the_same_each_time():
    schedule_id = uuid.uuid4()
    t = datetime(2025, 1, 1, tzinfo=UTC)
    delays = [jitter_sec(schedule_id, t + timedelta(minutes=m), 30.0) for m in range(200)]
    assert all(0 <= d <= 30 for d in delays)
    assert max(delays) - min(delays) > 20  # spread, not constant
    assert jitter_sec(schedule_id, t, 30.0) == jitter_sec(schedule_id, t.astimezone(BERLIN), 30.0)
    assert jitter_sec(schedule_id, t, 0) == 0


MINUTELY = Spec(cron="* * * * *", every_sec=None)
T = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def state(overlap: Overlap, *, busy: bool = False, buffered: datetime | None = None, window: float = 300) -> State:
    return State(next_fire_at=T, buffered_for=buffered, busy=busy, overlap=overlap, catchup_window_sec=window)


def test_plan_after_downtime_fires_within_the_window_oldest_first_and_counts_the_rest_missed():
    p = plan(MINUTELY, state(Overlap.ALLOW), T + timedelta(minutes=9, seconds=30))
    assert p.fires == [T + timedelta(minutes=m) for m in range(5, 10)]
    assert p.missed == 5 and p.last_skip == (T + timedelta(minutes=4), "missed")
    assert p.next_fire_at == T + timedelta(minutes=10)


def test_plan_skip_fires_the_oldest_and_skips_the_rest():
    p = plan(MINUTELY, state(Overlap.SKIP), T + timedelta(minutes=2))
    assert p.fires == [T] and p.skipped == [T + timedelta(minutes=1), T + timedelta(minutes=2)]
    busy = plan(MINUTELY, state(Overlap.SKIP, busy=True), T)
    assert busy.fires == [] and busy.skipped == [T] and busy.last_skip == (T, "overlap")


def test_plan_buffer_one_keeps_one_waiting():
    p = plan(MINUTELY, state(Overlap.BUFFER_ONE, busy=True), T + timedelta(minutes=2))
    assert p.fires == [] and p.buffered_for == T and len(p.skipped) == 2
    released = plan(MINUTELY, state(Overlap.BUFFER_ONE, buffered=T - timedelta(minutes=1)), T)
    assert released.fires == [T - timedelta(minutes=1)] and released.buffered_for == T


def test_plan_bounds_the_fires_of_one_tick():
    every_second = Spec(cron=None, every_sec=1, anchor=T)
    p = plan(every_second, state(Overlap.ALLOW, window=86400), T + timedelta(hours=1), max_fires=100)
    assert len(p.fires) == 100 and p.next_fire_at == T + timedelta(seconds=100)
