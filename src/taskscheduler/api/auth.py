"""API keys: with API_KEYS set, every request but the public ones needs `Authorization: Bearer <key>`.

An ASGI middleware in front of everything else, so that a stranger gets a 401 before the body of
the request is read or validated, and so that a new route is protected without anyone having to
remember it (the list of exceptions is short and explicit). The keys are never logged.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from taskscheduler.auth import bearer_ok


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, *, keys: list[str], public_paths: Iterable[str]) -> None:
        self.app = app
        self.keys = list(keys)
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        if path in self.public_paths:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                header = value.decode("latin-1")
                break
        if bearer_ok(header, self.keys):
            await self.app(scope, receive, send)
            return
        detail = "missing API key: send `Authorization: Bearer <key>`" if header is None else "invalid API key"
        response = JSONResponse(
            {"detail": detail}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="taskscheduler"'}
        )
        await response(scope, receive, send)
