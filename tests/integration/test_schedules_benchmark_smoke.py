"""The schedules benchmark at its smoke size, so that it cannot rot (no speed is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.harness import Services
from tests.integration.test_benchmarks_smoke import positive, run_benchmark


@pytest.mark.timeout(300)
def test_schedules_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("schedules", services, tmp_path)
    n = data["params"]["schedules"]
    runs = data["runs"]
    assert runs["burst"]["fired_median"] == n
    assert runs["idle"]["fired_median"] == 0
    assert 0 < runs["steady_second"]["fired_median"] < n
    assert positive(runs["burst"]["wall_ms"]) and positive(data["burst_us_per_schedule"])
    assert "schedules_due_idx" in data["plans"]["LOCK_DUE"]
