"""The API's documentation: Swagger UI at /docs and ReDoc at /redoc, from local files, and the schema."""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from taskscheduler import handlers

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# Swagger UI's and ReDoc's files, served from the installed fastapi-offline distribution (the ones
# FastAPI's pages would load from a CDN): the pages work offline and load nothing from another host.
STATIC_URL = "/docs/static"
STATIC_DIR = files("fastapi_offline") / "static"
# Public: no API key needed for these.
PATHS = (DOCS_URL, OAUTH2_REDIRECT_URL, OPENAPI_URL, REDOC_URL)


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, as FastAPI serves them but with local assets; the
    schema with every property described."""
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    app.mount(STATIC_URL, StaticFiles(directory=str(STATIC_DIR)), name="docs-static")

    def page(request: Request, title: str) -> tuple[dict[str, Any], str, str]:
        """What every page is given (the schema's address, a title), and the app's root path and
        that of the assets, under the root path the app is served at."""
        root = request.scope.get("root_path", "").rstrip("/")
        return {"openapi_url": root + OPENAPI_URL, "title": f"{app.title} - {title}"}, root, root + STATIC_URL

    async def swagger_ui(request: Request) -> HTMLResponse:
        common, root, static = page(request, "Swagger UI")
        return get_swagger_ui_html(
            **common,
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            # Swagger UI would otherwise send the schema's address to swagger.io's online validator.
            swagger_ui_parameters={"validatorUrl": None},
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        common, _, static = page(request, "ReDoc")
        js, favicon = f"{static}/redoc.standalone.js", f"{static}/favicon.png"
        return get_redoc_html(**common, redoc_js_url=js, redoc_favicon_url=favicon, with_google_fonts=False)

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
    list, and a client generated from the schema cannot send a name the API would refuse), each
    typed task's payload schema, and every property described."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # FastAPI's own builder caches it in app.openapi_schema
            components = schema["components"]["schemas"]
            components["TaskCreate"]["properties"]["name"]["enum"] = handlers.registered_names()
            add_payload_schemas(components)
            for model, descriptions in _FASTAPI_SCHEMA_DESCRIPTIONS.items():
                properties = components.get(model, {}).get("properties", {})
                for prop, description in descriptions.items():
                    if prop in properties:
                        properties[prop].setdefault("description", description)
        return app.openapi_schema  # type: ignore[return-value]

    return openapi


def add_payload_schemas(components: dict[str, Any]) -> None:
    """Each typed task's payload model as a schema of its own, and in `TaskCreate` (so in a batch's
    tasks too) one `if name is X then payload is its model` per typed task: Swagger lists the
    models, and a client generated from the schema sends payloads the API takes."""
    typed: dict[str, type[BaseModel]] = {}
    for name in handlers.registered_names():
        handler = handlers.get_handler(name)
        if isinstance(handler, handlers.Task) and handler.payload_model is not None:
            typed[name] = handler.payload_model
    if not typed:
        return
    models = sorted(set(typed.values()), key=lambda model: (model.__name__, model.__module__))
    template = "#/components/schemas/{model}"
    refs, definitions = models_json_schema([(m, "validation") for m in models], ref_template=template)
    # A model named like one of the API's own schemas (or two models of one name) must not replace it.
    if any(n in components and components[n] != d for n, d in definitions.get("$defs", {}).items()):
        template = "#/components/schemas/payload.{model}"
        refs, definitions = models_json_schema([(m, "validation") for m in models], ref_template=template)
    prefix = template.rsplit("/", 1)[1].removesuffix("{model}")
    for name, definition in definitions.get("$defs", {}).items():
        components[prefix + name] = definition
    create = components["TaskCreate"]
    create["allOf"] = [
        {
            "if": {"properties": {"name": {"const": name}}, "required": ["name"]},
            "then": {"properties": {"payload": refs[(model, "validation")]}},
        }
        for name, model in typed.items()
    ]
    takes = ", ".join(
        f"`{name}` takes `{refs[(model, 'validation')]['$ref'].rsplit('/', 1)[1]}`" for name, model in typed.items()
    )
    payload = create["properties"]["payload"]
    payload["description"] = f"{payload.get('description', '')} Typed tasks: {takes}.".strip()
