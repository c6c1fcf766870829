"""The dashboard, served by the API process at /ui: server-rendered pages from the package's templates,
our own small script and stylesheet, nothing from another host.

`router` holds its routes (included with the API's); `install` adds what an app needs beside them:
the sessions, the static files, the error pages. The API-key middleware lets /ui through: the
dashboard asks for its own login (a session cookie, see `session`) when API_KEYS is set, on every
route but the login page and the static files.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from taskscheduler.api.ui import actions, pages, schedules
from taskscheduler.api.ui.access import PREFIX, CsrfRefused, LoginRequired, base_url, page, see_other
from taskscheduler.api.ui.render import STATIC_DIR
from taskscheduler.api.ui.session import Sessions
from taskscheduler.config import Settings

__all__ = ["PREFIX", "install", "router"]

router = APIRouter(prefix=PREFIX, include_in_schema=False)
for routes in (actions.public_router, pages.router, actions.router, schedules.router):
    router.include_router(routes)


@router.get("")
async def to_dashboard(request: Request) -> Response:
    return see_other(request, base_url(request) + "/")


def install(app: FastAPI, settings: Settings) -> None:
    """What the dashboard needs of `app` beside its routes (`router`)."""
    app.state.ui_sessions = Sessions(settings.api_key_list)
    app.mount(PREFIX + "/static", StaticFiles(directory=STATIC_DIR), name="ui-static")

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            target = base_url(request) + "/"
        return see_other(request, f"{base_url(request)}/login?next={quote(target, safe='/')}")

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, exc: CsrfRefused) -> Response:
        message = (
            "This form did not come from this dashboard, or it expired (its CSRF token is missing or wrong):"
            " nothing was changed. Reload the page and try again."
        )
        return page(request, "error.html", status_code=403, title="Refused", message=message)

    @app.exception_handler(pages.BadInput)
    async def bad_input(request: Request, exc: pages.BadInput) -> Response:
        return page(request, "error.html", status_code=400, title="Cannot show this", message=str(exc))
