"""The dashboard's assets: colours that pass WCAG AA in both schemes, charts, nothing from another host,
and every template and static file shipped in the package."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from taskscheduler.api.ui.render import STATIC_DIR, TEMPLATES_DIR, Series, line_chart

CSS = (STATIC_DIR / "ui.css").read_text()
PACKAGE = Path(__file__).resolve().parents[2] / "src" / "taskscheduler"


def relative_luminance(hex_colour: str) -> float:
    value = hex_colour.lstrip("#")
    channels = [int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def scheme_variables(dark: bool) -> dict[str, str]:
    """The custom properties of :root, overridden by the dark block when `dark`."""
    light_block = CSS[CSS.index(":root {") : CSS.index("@media (prefers-color-scheme: dark)")]
    dark_block = CSS[CSS.index("@media (prefers-color-scheme: dark)") :].split("\n}\n", 1)[0]
    found = dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})", light_block))
    if dark:
        found.update(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})", dark_block))
    return found


TEXT_PAIRS = [
    ("fg", "bg"),
    ("fg", "panel"),
    ("muted", "bg"),
    ("muted", "panel"),
    ("link", "bg"),
    ("link", "panel"),
    ("ok-fg", "ok-bg"),
    ("warn-fg", "warn-bg"),
    ("error-fg", "error-bg"),
    ("button-fg", "button-bg"),
    ("danger-fg", "danger-bg"),
    *[
        (f"s-{s}-fg", f"s-{s}-bg")
        for s in ("pending", "enqueued", "started", "succeeded", "failed", "dead", "cancelled")
    ],
]
# Lines of the charts and the focus ring: non-text contrast, 3:1 (WCAG 1.4.11).
GRAPHIC_PAIRS = [("q-high", "bg"), ("q-default", "bg"), ("q-low", "bg"), ("focus", "bg"), ("focus", "panel")]


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_every_colour_pair_passes_wcag_aa(dark: bool) -> None:
    colours = scheme_variables(dark)
    failing = [
        f"{fg} on {bg}: {contrast(colours[fg], colours[bg]):.2f}"
        for fg, bg in TEXT_PAIRS
        if contrast(colours[fg], colours[bg]) < 4.5
    ]
    failing += [
        f"{fg} on {bg}: {contrast(colours[fg], colours[bg]):.2f}"
        for fg, bg in GRAPHIC_PAIRS
        if contrast(colours[fg], colours[bg]) < 3.0
    ]
    assert not failing


def test_the_dark_scheme_overrides_every_colour() -> None:
    light, dark = scheme_variables(False), scheme_variables(True)
    assert set(light) == set(dark)
    assert all(light[name] != dark[name] for name in light)


def test_the_contrast_formula_matches_wcag_examples() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#767676", "#ffffff") == pytest.approx(4.54, abs=0.01)


def test_templates_and_assets_load_nothing_from_another_host() -> None:
    for path in [*TEMPLATES_DIR.iterdir(), *STATIC_DIR.iterdir()]:
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name
        assert "@import" not in text and "url(http" not in text, path.name


def test_every_template_and_static_file_is_package_data() -> None:
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["taskscheduler"]
    files = [p.relative_to(PACKAGE).as_posix() for d in (TEMPLATES_DIR, STATIC_DIR) for p in d.iterdir()]
    assert files
    assert [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)] == []


def test_a_chart_scales_to_a_round_maximum_and_breaks_lines_at_gaps() -> None:
    series = [Series("high", "q-high", [1, 2, None, 7, None, 3, 4])]
    chart = line_chart("t", "tasks", series, [str(i) for i in range(7)], width=400, height=200)
    assert [t.label for t in chart.y_ticks][-1] == "10"
    ((_, segments, dots),) = chart.lines
    assert len(segments) == 2 and segments[0].startswith("M") and " L" in segments[0]
    assert len(dots) == 1  # the 7 stands alone
    assert not chart.empty
    assert chart.table_rows()[2] == ("3", ["7"])
    empty = line_chart("t", "tasks", [Series("low", "q-low", [0, 0, None])], ["a", "b", "c"])
    assert empty.empty and empty.table_rows() == []
