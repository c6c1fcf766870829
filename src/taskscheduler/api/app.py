"""The FastAPI application."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError

from taskscheduler import __version__, handlers
from taskscheduler.api.body_guard import BodyGuard
from taskscheduler.api.routes import router
from taskscheduler.config import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """
Run named tasks at a given time on a pool of workers, with retries, a dead-letter queue and
rescue of tasks from crashed or hung workers. Every task's state lives in PostgreSQL;
`GET /tasks/{id}/events` shows everything that happened to it.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    handlers.load_task_modules(settings.task_module_list)
    app = FastAPI(title="taskscheduler", version=__version__, description=DESCRIPTION)
    # The routes ask for settings through `get_settings`; give them the ones this app was built with.
    app.dependency_overrides[get_settings] = lambda: settings
    app.include_router(router)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", str(exc.orig).strip().splitlines()[0] if exc.orig else exc)
        return JSONResponse(
            {"detail": "database unavailable, try again"}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        # A connection dropped mid-request surfaces as a DBAPIError with connection_invalidated.
        if exc.connection_invalidated:
            return JSONResponse({"detail": "database unavailable, try again"}, status_code=503)
        raise exc

    return app
