"""The FastAPI app: OpenAI and LMServer routes, the chat page, API keys, a body size limit, and errors
that are always JSON in OpenAI's shape (4xx for anything a client can cause, never a 500 for bad input)."""
from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import arena, lmserver, openai_api, ops
from .metrics import CountRequests, Metrics
from .runtime import ClientGone, ServedModel
from .schemas import APIError, error_response

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("camelid.serve")

# Paths anyone may read without the API key: the page itself and the readiness and health probes.
PUBLIC = ("/", "/ready", "/health", "/favicon.ico")
# The route groups, in order; a new group of routes is one more entry here.
ROUTERS = [openai_api.router, lmserver.router, ops.router]
PUBLIC_PREFIXES = ("/static/",)


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_temperature: float = 1.0  # EasyLM's default for /generate and /chat
    lm_max_tokens: int = 256  # new tokens of /generate and /chat
    lm_top_k: int = 50  # EasyLM samples with top-k 50
    greedy_until_max_length: int = 1024
    cors_origins: tuple[str, ...] = ()  # none: browsers on other origins may not call the API
    votes_path: str | None = None  # the arena's votes database (default: under the user's data folder)


class Guard:
    """Plain ASGI middleware (BaseHTTPMiddleware would hide client disconnects from streaming responses):
    checks the API key, then reads the body up front, answering 413 beyond the limit whether or not a
    Content-Length was sent, and replays it to the app."""

    def __init__(self, app, limit: int, api_key: str | None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and path not in PUBLIC + arena.PAGES and not path.startswith(PUBLIC_PREFIXES):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                what = "a wrong API key" if given else "no API key"
                response = error_response(401, f"{what} was given: send the header 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size = [], 0
        while not too_big:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_big = size > self.limit
            if not message.get("more_body"):
                break
        if too_big:
            response = error_response(413, f"the request body is larger than the limit of {self.limit} bytes",
                                      code="request_too_large")
            return await response(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for the disconnect, as the app expects

        return await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object", None
    where = ".".join(loc) or "body"
    if first.get("type") == "extra_forbidden":
        return f"the field {where!r} is not supported by this server; leave it out", where
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{more}", (loc[0] if loc else None)


def create_app(models: list[ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    """The app over already-loaded models; their schedulers start and stop with it."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for m in models:
            m.scheduler.start()
        yield
        for m in models:
            m.scheduler.stop()

    app = FastAPI(title="camelid", description="OpenAI-compatible and EasyLM LMServer APIs over camelid models.",
                  lifespan=lifespan)
    app.state.models = {m.id: m for m in models}
    app.state.settings = settings
    app.state.metrics = Metrics(models)
    for m in models:
        m.metrics = app.state.metrics
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if len(models) >= 2:  # a blind side-by-side needs two models to choose from
        arena.install(app, [m.id for m in models], settings.votes_path)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}
        # A 405 keeps its Allow header (RFC 9110): the methods the path does take.
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                              type="invalid_request_error", code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: the client has left

    app.add_middleware(Guard, limit=settings.max_body_bytes, api_key=settings.api_key)
    app.add_middleware(CountRequests, metrics=app.state.metrics)
    if settings.cors_origins:  # outermost: a browser's preflight needs no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document with what this server really answers: a bad body is a 400 in OpenAI's error shape
    (FastAPI documents its own 422, which never happens here)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema

