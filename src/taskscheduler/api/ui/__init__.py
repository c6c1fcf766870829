"""The dashboard, served by the API process at /ui: server-rendered pages from the package's templates,
our own small script and stylesheet, nothing from another host.

`install` adds it to an app. The API-key middleware lets /ui through: the dashboard asks for its own
login (a session cookie, see `session`) when API_KEYS is set, on every route but the login page and
the static files.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from taskscheduler.api.ui import actions, pages
from taskscheduler.api.ui.access import PREFIX, CsrfRefused, LoginRequired, base_url, page, see_other
from taskscheduler.api.ui.render import STATIC_DIR
from taskscheduler.api.ui.session import Sessions
from taskscheduler.config import Settings

__all__ = ["PREFIX", "install"]


def install(app: FastAPI, settings: Settings) -> None:
    app.state.ui_sessions = Sessions(settings.api_key_list)
    app.mount(PREFIX + "/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.include_router(actions.public_router, prefix=PREFIX)
    app.include_router(pages.router, prefix=PREFIX)
    app.include_router(actions.router, prefix=PREFIX)

    async def to_dashboard(request: Request) -> Response:
        return see_other(request, base_url(request) + "/")

    app.add_route(PREFIX, to_dashboard, include_in_schema=False)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            target = base_url(request) + "/"
        return see_other(request, f"{base_url(request)}/login?next={_quote(target)}")

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


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="/")
