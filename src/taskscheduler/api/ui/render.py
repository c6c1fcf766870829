"""Rendering: the Jinja2 environment of the package's templates, the filters they use, and the charts,
drawn here as SVG (no script, nothing fetched)."""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from taskscheduler.explain import duration
from taskscheduler.schedule_spec import zone

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"


def when(value: datetime | None) -> str:
    """A moment as the dashboard shows it: UTC, to the second."""
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def when_ms(value: datetime | None) -> str:
    """To the millisecond, where the order of quick steps matters (a task's timeline)."""
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def when_in(value: datetime | None, timezone: str) -> str:
    """A moment in a schedule's time zone, with its abbreviation (CET, CEST): how its cron reads it."""
    if value is None:
        return ""
    return value.astimezone(zone(timezone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def seconds(value: float | None) -> str:
    """A duration in seconds for a table cell; blank when unknown."""
    return "" if value is None else duration(value)


def count(value: int) -> str:
    return f"{value:,}"


def query(params: dict[str, Any]) -> str:
    """A query string of the non-empty values (lists repeated: ?status=DEAD&status=FAILED)."""
    return urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "", [])}, doseq=True)


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=select_autoescape(["html"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=when,
        when_ms=when_ms,
        when_in=when_in,
        iso=iso,
        pretty_json=pretty_json,
        seconds=seconds,
        count=count,
        duration=duration,
        query=query,
    )
    return env


# --- charts -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    label: str
    css_class: str  # the line's colour (CSS), one per queue
    values: Sequence[float | None]  # one per slot; None: no value there (a gap in the line)
    dashed: bool = False


@dataclass(frozen=True)
class Tick:
    at: float  # pixels along the axis
    label: str


@dataclass
class Chart:
    """A line chart: what the template draws, and the numbers behind it for a table."""

    title: str
    unit: str
    width: int
    height: int
    left: int
    top: int
    plot_width: int
    plot_height: int
    # Each series with its path segments, and the points that stand alone (a path of one point draws nothing).
    lines: list[tuple[Series, list[str], list[tuple[float, float]]]] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    slot_labels: list[str] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    empty: bool = True
    format_value: Any = None

    def table_rows(self) -> list[tuple[str, list[str]]]:
        """The slots that have a value, with each series' value formatted (blank where it has none)."""
        fmt = self.format_value or str
        rows = []
        for i, label in enumerate(self.slot_labels):
            values = [s.values[i] for s in self.series]
            if any(v for v in values):
                rows.append((label, ["" if v is None else fmt(v) for v in values]))
        return rows


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `value`."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0):
        if step * power >= value:
            return step * power
    return 10.0 * power


def line_chart(
    title: str,
    unit: str,
    series: Sequence[Series],
    slot_labels: Sequence[str],
    *,
    format_value: Any = None,
    width: int = 560,
    height: int = 200,
) -> Chart:
    """Lines over equal slots (the minutes of the last hour), the y axis from 0 to a round maximum."""
    left, right, top, bottom = 56, 12, 12, 28
    chart = Chart(
        title=title,
        unit=unit,
        width=width,
        height=height,
        left=left,
        top=top,
        plot_width=width - left - right,
        plot_height=height - top - bottom,
        slot_labels=list(slot_labels),
        series=list(series),
        format_value=format_value,
    )
    values = [v for s in series for v in s.values if v is not None]
    chart.empty = not any(values)
    y_max = _nice_ceiling(max(values, default=0.0))
    slots = max(1, len(slot_labels) - 1)
    fmt = format_value or (lambda v: f"{v:g}")

    def x(i: int) -> float:
        return left + chart.plot_width * i / slots

    def y(v: float) -> float:
        return top + chart.plot_height * (1 - v / y_max)

    for i in range(5):
        v = y_max * i / 4
        chart.y_ticks.append(Tick(round(y(v), 1), fmt(v)))
    step = max(1, len(slot_labels) // 6)
    for i in range(0, len(slot_labels), step):
        chart.x_ticks.append(Tick(round(x(i), 1), slot_labels[i]))
    for s in series:
        runs: list[list[tuple[float, float]]] = [[]]
        for i, value in enumerate(s.values):
            if value is None:
                runs.append([])
            else:
                runs[-1].append((round(x(i), 1), round(y(value), 1)))
        segments = [
            " ".join(f"{'L' if n else 'M'}{px},{py}" for n, (px, py) in enumerate(run)) for run in runs if len(run) > 1
        ]
        dots = [run[0] for run in runs if len(run) == 1]
        chart.lines.append((s, segments, dots))
    return chart
