"""API keys: with API_KEYS set, every request but the public ones needs `Authorization: Bearer <key>`.

An ASGI middleware in front of everything else, so that a stranger gets a 401 before the body of
the request is read or validated, and so that a new route is protected without anyone having to
remember it (the list of exceptions is short and explicit). The keys are never logged.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from taskscheduler.auth import RefusalLog, bearer_ok


class ApiKeyAuth:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: list[str],
        public_paths: Iterable[str],
        public_prefixes: Iterable[str] = (),
        refusals: RefusalLog | None = None,
    ) -> None:
        self.app = app
        self.keys = list(keys)
        self.public_paths = frozenset(public_paths)
        # Each must be a folder served by a static mount only (the docs' assets): StaticFiles keeps a
        # request inside its folder, so `../` cannot reach a protected route through the prefix.
        self.public_prefixes = tuple(public_prefixes)
        self.refusals = refusals or RefusalLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        if path in self.public_paths or path.startswith(self.public_prefixes):
            await self.app(scope, receive, send)
            return
        headers = [value for name, value in scope["headers"] if name.lower() == b"authorization"]
        if len(headers) > 1:
            # Proxies and frameworks disagree on which of several they read: refuse rather than
            # check one of them while something behind us might read another.
            status, reason = 400, "several Authorization headers: send exactly one"
        else:
            header = headers[0].decode("latin-1") if headers else None
            if bearer_ok(header, self.keys):
                await self.app(scope, receive, send)
                return
            status = 401
            reason = "missing API key: send `Authorization: Bearer <key>`" if header is None else "invalid API key"
        client = scope.get("client")
        self.refusals.refused(client[0] if client else "unknown", reason, f"{scope['method']} {path}")
        challenge = {"WWW-Authenticate": 'Bearer realm="taskscheduler"'} if status == 401 else None
        response = JSONResponse({"detail": reason}, status_code=status, headers=challenge)
        await response(scope, receive, send)
