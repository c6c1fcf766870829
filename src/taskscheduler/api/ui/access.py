"""Who may use the dashboard: the session dependency, login required when API_KEYS is set, CSRF on
every POST, and the pages' responses (cookie, security headers)."""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from taskscheduler.api.ui.render import environment
from taskscheduler.api.ui.session import COOKIE_NAME, NONCE_COOKIE_NAME, SESSION_TTL_SEC, Session, Sessions
from taskscheduler.auth import RefusalLog

PREFIX = "/ui"
# The pages load nothing from anywhere else, run only our own script, and cannot be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none';"
        " frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
FORM_MAX_FIELDS = 50

templates = environment()
login_refusals = RefusalLog()


class LoginRequired(Exception):
    """The dashboard asks for a login (API_KEYS is set) and the request has no session."""


class CsrfRefused(Exception):
    """A POST whose CSRF token is missing or does not match its session."""


def base_url(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/") + PREFIX


def sessions_of(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.ui_sessions
    return sessions


def ui_session(request: Request) -> Session:
    """The visitor's session; a new anonymous one (its cookie set with the response) if it has none."""
    found: Session | None = getattr(request.state, "ui_session", None)
    if found is not None:
        return found
    sessions = sessions_of(request)
    session = sessions.read(request.cookies.get(COOKIE_NAME))
    if session is None or not session.logged_in:
        session = sessions.read(request.cookies.get(NONCE_COOKIE_NAME))
        if session is None or session.logged_in:  # missing, or a login cookie where a nonce belongs
            session, cookie = sessions.anonymous()
            set_cookie(request, NONCE_COOKIE_NAME, cookie)
    request.state.ui_session = session
    return session


def set_cookie(request: Request, name: str, value: str | None) -> None:
    """Have the response set (None: delete) a cookie of the dashboard."""
    cookies: dict[str, str | None] = getattr(request.state, "ui_cookies", {})
    cookies[name] = value
    request.state.ui_cookies = cookies


SessionDep = Annotated[Session, Depends(ui_session)]


def require_login(request: Request, session: SessionDep) -> Session:
    if sessions_of(request).login_required and not session.logged_in:
        raise LoginRequired()
    return session


LoggedInDep = Annotated[Session, Depends(require_login)]


async def form_fields(request: Request) -> dict[str, list[str]]:
    """The POSTed form (application/x-www-form-urlencoded; BodyGuard has bounded its size)."""
    body = (await request.body()).decode("utf-8", "replace")
    try:
        return urllib.parse.parse_qs(body, keep_blank_values=True, max_num_fields=FORM_MAX_FIELDS)
    except ValueError:
        raise CsrfRefused() from None


FormDep = Annotated[dict[str, list[str]], Depends(form_fields)]


def field(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def checked_form(request: Request, session: LoggedInDep, form: FormDep) -> dict[str, list[str]]:
    """The form of a POST that carries its session's CSRF token; CsrfRefused otherwise."""
    if not sessions_of(request).csrf_ok(session, field(form, "csrf")):
        raise CsrfRefused()
    return form


CheckedFormDep = Annotated[dict[str, list[str]], Depends(checked_form)]


def _loopback_client(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("testclient", "localhost")


def with_cookie(request: Request, response: Response) -> Response:
    """Headers every dashboard response carries, and the session cookie when it changed."""
    response.headers.update(SECURITY_HEADERS)
    cookies: dict[str, str | None] = getattr(request.state, "ui_cookies", {})
    for name, value in cookies.items():
        response.set_cookie(
            name,
            value or "",
            max_age=SESSION_TTL_SEC if value else 0,
            path=base_url(request) + "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return response


def page(request: Request, template: str, *, status_code: int = 200, **context: Any) -> Response:
    session = ui_session(request)
    sessions = sessions_of(request)
    html = templates.get_template(template).render(
        base=base_url(request),
        csrf=sessions.csrf_token(session),
        logged_in=session.logged_in,
        login_required=sessions.login_required,
        # Without API_KEYS, anyone who reaches the API can act here: say so to a visitor from elsewhere.
        open_warning=not sessions.login_required and not _loopback_client(request),
        **context,
    )
    return with_cookie(request, HTMLResponse(html, status_code=status_code))


def redirect(request: Request, path: str, **query: Any) -> Response:
    """303 to a dashboard path (relative to /ui), so that reloading the result does not post again."""
    qs = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)
    return see_other(request, base_url(request) + path + (f"?{qs}" if qs else ""))


def see_other(request: Request, url: str) -> Response:
    return with_cookie(request, RedirectResponse(url, status_code=303))


def safe_next(request: Request, value: str | None) -> str:
    """Where to go after login: a dashboard path only, never another site (an open redirect)."""
    base = base_url(request)
    if value and value.startswith(base + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return base + "/"
