"""The one HTTP client of the API, for the commands people type (`taskscheduler submit`, `status`, `list`, ...)
and the SDK's submissions over HTTP (`taskscheduler.sdk`).

httpx is imported when a client is made, not with this module: every CLI command, the server roles
included, reads DEFAULT_URL from here when it starts."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SEC = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ClientError(Exception):
    """Something a person should read: a bad argument, an unreachable API or an HTTP error (then
    with its `status_code` and the body's `detail`)."""

    def __init__(self, message: str, *, status_code: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class Unreachable(ClientError):
    """The API could not be reached, or did not answer in time."""


def parse_duration(text: str) -> timedelta:
    """`90`, `10s`, `1.5m`, `2h`, `1h30m`, `500ms`, `1d` -> timedelta. A bare number is seconds."""
    value = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return timedelta(seconds=float(value))
    parts = _DURATION_PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ClientError(f"invalid duration {text!r}: use e.g. 30s, 10m, 1h30m, 2d or a number of seconds")
    return timedelta(seconds=sum(float(n) * _UNIT_SEC[u] for n, u in parts))


def error_detail(response: httpx.Response) -> Any:
    """The `detail` of an error answer (a list for a 422), or its text."""
    try:
        return response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text.strip()[:300] or response.reason_phrase


def describe_error(response: httpx.Response) -> str:
    """`HTTP 409: cannot cancel ...`, with each validation error as `field: message`."""
    detail = error_detail(response)
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "query", "path"))
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        detail = "; ".join(parts)
    message = f"HTTP {response.status_code}: {detail}"
    if response.status_code == 401:
        message += " (pass --api-key or set TASKSCHEDULER_API_KEY)"
    return message


class ApiClient:
    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise Unreachable(f"no answer from the API at {self.url} in time: {exc or type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach the API at {self.url}: {exc or type(exc).__name__}") from None
        return _answer(self.url, response)

    def submit(self, body: dict[str, Any] | bytes, idempotency_key: str | None = None) -> Any:
        """POST /tasks with `body`, a dict or the JSON document itself."""
        return self.request("POST", "/tasks", **_submission(body, idempotency_key))

    def get(self, task_id: str) -> Any:
        return self.request("GET", f"/tasks/{task_id}")

    def events(self, task_id: str) -> Any:
        return self.request("GET", f"/tasks/{task_id}/events")

    def list(self, params: dict[str, Any]) -> Any:
        return self.request("GET", "/tasks", params=params)

    def cancel(self, task_id: str) -> Any:
        return self.request("POST", f"/tasks/{task_id}/cancel")

    def retry(self, task_id: str) -> Any:
        return self.request("POST", f"/tasks/{task_id}/retry")


class AsyncApiClient:
    """`ApiClient`'s `submit` for asyncio (the SDK's `submit_async` over HTTP)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise Unreachable(f"no answer from the API at {self.url} in time: {exc or type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach the API at {self.url}: {exc or type(exc).__name__}") from None
        return _answer(self.url, response)

    async def submit(self, body: dict[str, Any] | bytes, idempotency_key: str | None = None) -> Any:
        return await self.request("POST", "/tasks", **_submission(body, idempotency_key))


def _submission(body: dict[str, Any] | bytes, idempotency_key: str | None) -> dict[str, Any]:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    if isinstance(body, bytes):
        return {"content": body, "headers": {**headers, "Content-Type": "application/json"}}
    return {"json": body, "headers": headers}


def _answer(url: str, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise ClientError(describe_error(response), status_code=response.status_code, detail=error_detail(response))
    if response.status_code == 204:
        return None
    try:
        return response.json()
    except ValueError:
        raise ClientError(f"the API at {url} answered something that is not JSON") from None
