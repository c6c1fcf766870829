"""The HTTP API: `create_app()` builds the FastAPI application.

`create_app` is imported on first use, so that the SDK can use the API's schemas and rules
(`api.schemas`, `api.body_guard`) without loading the application and its routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskscheduler.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from taskscheduler.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
