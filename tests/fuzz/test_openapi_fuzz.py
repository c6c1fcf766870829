"""schemathesis against the app's own OpenAPI schema, in process: no 5xx, responses match the schema.

Driven through Hypothesis directly (one test per operation) rather than schemathesis' pytest
plugin, which does not work with pytest 9 yet.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from taskscheduler.api import create_app

EXAMPLES_PER_OPERATION = 40
API_KEY = "fuzz-key"


@pytest.fixture
def api_schema(settings, typed_tasks):  # type: ignore[no-untyped-def]
    # With a key set, so the schema's security scheme is enforced and its checks are meaningful.
    app = create_app(settings.model_copy(update={"api_keys": API_KEY}), process_heartbeat=False)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_conforms_to_the_schema(api_schema):  # type: ignore[no-untyped-def]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):  # type: ignore[no-untyped-def]
            case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"})

        check()
