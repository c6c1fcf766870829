"""Errors as HTTP answers: the 422 of a check the schema cannot make, and one mapping of the store's
errors (the database unavailable or busy, an idempotency key misused) for the whole app."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse

from taskscheduler.store import db
from taskscheduler.store.creation import IdempotencyConflict, IdempotencyKeyInFlux
from taskscheduler.submission import field_error as field_error  # the routes import these from here
from taskscheduler.submission import unknown_task as unknown_task

log = logging.getLogger(__name__)

# A client may send the request again this soon (the Retry-After of every 503).
RETRY_AFTER = {"Retry-After": "1"}


def validation_error(errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=errors)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    detail = db.unavailable(exc)
    if detail is None:  # a statement refused, a bug: a 500, as without this handler
        raise exc
    log.warning("%s: %s", detail, _first_line(exc))
    return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers=RETRY_AFTER)


async def _idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)


async def _key_in_flux(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers=RETRY_AFTER)


def add_error_handlers(app: FastAPI) -> None:
    for error in db.UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, _database_unavailable)
    app.add_exception_handler(IdempotencyConflict, _idempotency_conflict)
    app.add_exception_handler(IdempotencyKeyInFlux, _key_in_flux)
