"""The API's documentation: an OpenAPI 3.1 schema that describes everything, and Swagger UI and ReDoc
pages that load their assets from the API itself (they work offline)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from taskscheduler.api import create_app
from taskscheduler.config import Settings

# The keywords of pydantic's Field that JSON Schema spells minimum, maximum, exclusiveMinimum...
PYDANTIC_ONLY_KEYWORDS = {"ge", "le", "gt", "lt", "multiple_of", "min_length", "max_length"}


@pytest.fixture
def secured(settings: Settings) -> Iterator[TestClient]:
    # With API keys set: the docs and their assets must still load without one.
    with TestClient(create_app(settings.model_copy(update={"api_keys": "docs-key"}))) as client:
        yield client


@pytest.fixture
def schema(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def test_the_schema_is_valid_openapi_3_1(schema: dict[str, Any]) -> None:
    assert schema["openapi"].startswith("3.1.")
    validate(schema, cls=OpenAPIV31SpecValidator)


def _properties(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property of every object schema under `node`, nested ones included."""
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            yield f"{where}.{name}", prop
        for key, value in node.items():
            yield from _properties(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _properties(value, f"{where}[{i}]")


def test_every_property_and_parameter_is_described(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    # The response models the issue named, so that an empty walk cannot pass.
    assert {"TaskOut", "TaskSummary", "TaskEventOut", "DlqEventOut", "TaskCreate"} <= set(components)
    undescribed = [where for where, prop in _properties(components, "schemas") if not prop.get("description")]
    assert undescribed == []
    parameters = [
        (method.upper(), path, parameter)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        for parameter in operation.get("parameters", [])
    ]
    assert ("GET", "/dlq", "limit") in {(m, p, param["name"]) for m, p, param in parameters}
    assert [(m, p, param["name"]) for m, p, param in parameters if not param.get("description")] == []


def _keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from _keys(value)


def test_ranges_are_json_schema_keywords(schema: dict[str, Any]) -> None:
    create = schema["components"]["schemas"]["TaskCreate"]["properties"]
    assert (create["priority"]["minimum"], create["priority"]["maximum"]) == (1, 10)
    assert create["max_retries"]["minimum"] == 0
    timeout = next(choice for choice in create["timeout_sec"]["anyOf"] if choice["type"] == "number")
    assert (timeout["exclusiveMinimum"], timeout["maximum"]) == (0, 7 * 24 * 3600)
    limit = next(p for p in schema["paths"]["/dlq"]["get"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 500)
    # No tool reads pydantic's own names for these: Swagger showed no range at all.
    assert PYDANTIC_ONLY_KEYWORDS.isdisjoint(_keys(schema["components"]))


def test_the_ranges_in_the_schema_are_the_ones_enforced(client: TestClient) -> None:
    for body, field in (
        ({"priority": 11}, "priority"),
        ({"priority": 0}, "priority"),
        ({"max_retries": -1}, "max_retries"),
    ):
        response = client.post("/tasks", json={"name": "demo_ok", **body})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", field]
    # 9.0 is an integer to JSON Schema, and still one to the API with the bounds moved.
    ok = client.post("/tasks", json={"name": "demo_ok", "priority": 10.0, "max_retries": 0})
    assert ok.status_code == 201, ok.text
    assert (ok.json()["priority"], ok.json()["max_retries"]) == (10, 0)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value is not None]


def _links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_load_nothing_from_another_host(secured: TestClient, page: str) -> None:
    response = secured.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    urls = _links(html)
    assert any(url.endswith(".js") for url in urls), urls
    for url in urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("", ""), url
        asset = secured.get(url)  # without an API key, as a browser loads it
        assert asset.status_code == 200, url
        assert asset.content, url
    # Nor from a script: no absolute URL anywhere in the page.
    assert "://" not in html
    assert "/openapi.json" in html


def test_the_docs_assets_are_the_packaged_swagger_ui_and_redoc(secured: TestClient) -> None:
    swagger = {url.rsplit("/", 1)[-1]: url for url in _links(secured.get("/docs").text)}
    redoc = {url.rsplit("/", 1)[-1]: url for url in _links(secured.get("/redoc").text)}
    bundle = secured.get(swagger["swagger-ui-bundle.js"])
    assert "SwaggerUIBundle" in bundle.text
    # Swagger UI renders OpenAPI 3.1 from version 5 on; 4.x shows "Unable to render this definition".
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.', bundle.text)
    assert version is not None, "no Swagger UI version in the bundle"
    assert int(version.group(1)) >= 5
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert secured.get(swagger["swagger-ui.css"]).headers["content-type"].startswith("text/css")
    assert "Redoc" in secured.get(redoc["redoc.standalone.js"]).text
    # The Authorize dialog's OAuth2 redirect page is still served, and public.
    assert secured.get("/docs/oauth2-redirect").status_code == 200


def _status_of_raw_path(app: Any, path: str) -> int:
    """The status the app answers a GET of `path` sent as is: HTTP clients resolve `..` before sending,
    a hand-written request does not, and uvicorn passes it on unchanged."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 12345),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    asyncio.run(app(scope, receive, send))
    return statuses[0]


def test_the_public_assets_prefix_opens_nothing_else(secured: TestClient) -> None:
    app = secured.app
    assert _status_of_raw_path(app, "/tasks") == 401
    # Public by path prefix: a path that climbs out of it is still served by the assets' folder alone.
    for path in ("/docs/static/../../tasks", "/docs/static/../../openapi.json", "/docs/static/../app.py"):
        assert _status_of_raw_path(app, path) == 404, path
    assert _status_of_raw_path(app, "/docs/staticx") == 401
