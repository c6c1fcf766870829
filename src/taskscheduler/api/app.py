"""The FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolBusy

from taskscheduler import __version__, handlers
from taskscheduler.api.auth import ApiKeyAuth
from taskscheduler.api.body_guard import BodyGuard
from taskscheduler.api.routes import health_router, router
from taskscheduler.api.schedules import router as schedules_router
from taskscheduler.config import Settings, get_settings
from taskscheduler.liveness import ProcessHeartbeat
from taskscheduler.store import db
from taskscheduler.store.tasks import IdempotencyKeyInFlux

log = logging.getLogger(__name__)

DESCRIPTION = """
Run named tasks at a given time on a pool of workers, with retries, a dead-letter queue and
rescue of tasks from crashed or hung workers. Every task's state lives in PostgreSQL;
`GET /tasks/{id}/events` shows everything that happened to it.

**Operating it:** `GET /tasks` finds tasks (by status, name, queue, creation time; paginated),
`POST /tasks/{id}/cancel` stops one that has not started, `POST /tasks/{id}/retry` and
`POST /dlq/retry` bring dead ones back, `GET /metrics` is for Prometheus.

**Authentication:** when the server sets `API_KEYS`, every route but `/healthz`, `/readyz` and these
docs needs `Authorization: Bearer <key>`: press **Authorize** and enter a key.
"""

TAGS = [
    {"name": "tasks", "description": "Create, find, cancel and retry tasks."},
    {"name": "dlq", "description": "The dead-letter queue: tasks that ran out of retries or got stuck."},
    {"name": "schedules", "description": "Recurring schedules: tasks created at cron or interval fire times."},
    {"name": "operations", "description": "Metrics for Prometheus."},
    {"name": "health", "description": "Probes for orchestrators; no API key needed."},
]

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# Swagger UI's and ReDoc's files, served from the installed fastapi-offline distribution (the ones
# FastAPI's pages would load from a CDN): the pages work offline and load nothing from another host.
DOCS_STATIC_URL = "/docs/static"
DOCS_STATIC_DIR = files("fastapi_offline") / "static"


def create_app(settings: Settings | None = None, *, process_heartbeat: bool = True) -> FastAPI:
    """The API. With `process_heartbeat`, it records its liveness for `taskscheduler check api`
    while it runs (between its startup and shutdown)."""
    settings = settings or get_settings()
    handlers.load_task_modules(settings.task_module_list)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        heartbeat = None
        if process_heartbeat:
            heartbeat = ProcessHeartbeat(
                "api", interval_sec=settings.process_heartbeat_sec, database_url=settings.database_url or None
            ).start()
        # The creating routes run their statements on the event loop, on these connections; without
        # a lifespan (some test clients), they open one per request. Opened without waiting for the
        # connections: the API starts while the database is down, and answers 503 until it is up.
        pool = db.statement_pool(settings.database_url or None, size=settings.db_pool_size)
        await pool.open(wait=False)
        app.state.statement_pool = pool
        try:
            yield
        finally:
            app.state.statement_pool = None
            await pool.close()
            if heartbeat is not None:
                heartbeat.stop()

    # No redirect from `/tasks/` to `/tasks`: Starlette builds its Location from the Host header,
    # which the client chooses. A path with a trailing slash is a 404.
    app = FastAPI(
        title="taskscheduler",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        redirect_slashes=False,
        openapi_url=OPENAPI_URL,
        # Served by _add_docs from local files instead.
        docs_url=None,
        redoc_url=None,
    )
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    _add_docs(app)

    # The routes ask for settings through `get_settings`; give them the ones this app was built with.
    # async: FastAPI would run a sync dependency in the thread pool, a hop per request.
    async def app_settings() -> Settings:
        return settings

    app.dependency_overrides[get_settings] = app_settings
    # The hot routes read them here: with an override, FastAPI inspects the override's signature on
    # every request.
    app.state.settings = settings
    app.include_router(router)
    app.include_router(schedules_router)
    app.include_router(health_router)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    # Outermost: a request without a valid key is refused before its body is read.
    public = {"/healthz", "/readyz", DOCS_URL, OAUTH2_REDIRECT_URL, OPENAPI_URL, REDOC_URL}
    app.add_middleware(
        ApiKeyAuth, keys=settings.api_key_list, public_paths=public, public_prefixes=[DOCS_STATIC_URL + "/"]
    )

    @app.exception_handler(IdempotencyKeyInFlux)
    async def key_in_flux(request: Request, exc: IdempotencyKeyInFlux) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(PoolBusy)
    async def no_pooled_connection(request: Request, exc: PoolBusy) -> JSONResponse:
        # Every connection of the engine's pool stayed taken for DB_POOL_TIMEOUT_SEC.
        log.warning("database pool exhausted: no connection free within %gs", settings.db_pool_timeout_sec)
        return JSONResponse(
            {"detail": "all database connections are busy, try again"}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        if isinstance(exc.orig, psycopg.errors.LockNotAvailable):
            # lock_timeout (deps.get_locking_conn): another transaction holds the task's row.
            detail = "the task is being changed by another transaction, try again"
            return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
        log.warning("database unavailable: %s", str(exc.orig).strip().splitlines()[0] if exc.orig else exc)
        return JSONResponse(
            {"detail": "database unavailable, try again"}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(PoolTimeout)
    async def no_database_connection(request: Request, exc: PoolTimeout) -> JSONResponse:
        # No pooled connection came back in time: the database is down (the pool keeps reopening).
        log.warning("database unavailable: %s", exc)
        return JSONResponse(
            {"detail": "database unavailable, try again"}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(psycopg.OperationalError)
    async def database_unavailable_async(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        # The routes that talk to psycopg directly (db.AsyncStatementPool) get its own exception.
        log.warning("database unavailable: %s", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc))
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


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, as FastAPI serves them but with local assets."""
    app.mount(DOCS_STATIC_URL, StaticFiles(directory=str(DOCS_STATIC_DIR)), name="docs-static")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + OPENAPI_URL,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC_URL}/favicon.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            # Swagger UI would otherwise send the schema's address to swagger.io's online validator.
            swagger_ui_parameters={"validatorUrl": None},
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=root + OPENAPI_URL,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route(DOCS_URL, swagger_ui, include_in_schema=False)
    app.add_route(OAUTH2_REDIRECT_URL, swagger_ui_redirect, include_in_schema=False)
    app.add_route(REDOC_URL, redoc, include_in_schema=False)


# FastAPI's own validation-error schemas, which it leaves undescribed.
_FASTAPI_SCHEMA_DESCRIPTIONS = {
    "HTTPValidationError": {"detail": "One entry per problem found in the request."},
    "ValidationError": {
        "loc": "Where: `body`, `query`, `path` or `header`, then the field's path (names and list indexes).",
        "msg": "What is wrong, in words.",
        "type": "The kind of error, e.g. `missing`, `int_type` or `value_error`.",
        "input": "The value that was refused.",
        "ctx": "Details of the error, e.g. the limit that was exceeded.",
    },
}


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The schema, with `name` limited to the registered handlers (Swagger then offers them in a
    list, and a client generated from the schema cannot send a name the API would refuse) and
    every property described."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # FastAPI's own builder caches it in app.openapi_schema
            components = schema["components"]["schemas"]
            components["TaskCreate"]["properties"]["name"]["enum"] = handlers.registered_names()
            for model, descriptions in _FASTAPI_SCHEMA_DESCRIPTIONS.items():
                properties = components.get(model, {}).get("properties", {})
                for prop, description in descriptions.items():
                    if prop in properties:
                        properties[prop].setdefault("description", description)
        return app.openapi_schema  # type: ignore[return-value]

    return openapi
