"""The ASGI app factory and the process that serves it."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from collections.abc import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from app.auth import ApiKeyMiddleware, load_keys, protected_prefixes, reload_keys
from app.browser_guard import BrowserGuard, HostPolicy
from app.completion_endpoint import CompletionFastPath
from app.edge import Edge
from app.errors import GatewayError, error_body
from app.gateway import Gateway
from app.http_limits import limited_protocol
from app.logs_api import router as logs_router
from app.metrics import install_metrics
from app.metrics import router as metrics_router
from app.profiles import ProfileSet
from app.reload import ProfileReloader
from app.routes import router
from app.settings import Settings
from app.status import install_status
from app.status import router as status_router

logger = logging.getLogger("specgate")


class SpecgateApp(FastAPI):
    """FastAPI with an optional plain-ASGI layer in front of its whole middleware stack (app/fastpath.py)."""

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front is None else self.front(stack)


def create_app(settings: Settings, profiles: ProfileSet) -> Edge:
    """Build the app, behind its edge (app/edge.py); nothing starts until the ASGI lifespan does."""
    gateway = Gateway(settings, profiles)
    # Read the key file now: a missing or empty one stops start-up rather than leaving the gateway open.
    keys = load_keys(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        reloader = ProfileReloader(gateway, settings.profiles_dir, settings.reload_poll_seconds)
        # SIGHUP also re-reads the key file: keys rotate without a restart (in place: the middleware holds the list).
        reloader.on_sighup_also.append(lambda: reload_keys(settings, keys))
        reloader.install(watch=settings.reload_on_change)
        try:
            yield
        finally:
            await reloader.close()
            await gateway.close()

    app = SpecgateApp(title="specgate", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    app.include_router(router)
    app.include_router(logs_router)
    install_metrics(app, gateway)
    app.include_router(metrics_router)
    install_status(app, gateway)
    app.include_router(status_router)
    _install_error_handlers(app)
    app.add_middleware(ApiKeyMiddleware, keys=keys, prefixes=protected_prefixes(settings))
    origins = [origin for origin in settings.cors_origins.replace(",", " ").split() if origin]
    if origins:
        # Outside the key check: a browser's preflight carries no Authorization header.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
        )
    if not origins:
        # The completion endpoints skip the stack above (same id, key check and errors, fewer layers per
        # token); with CORS on they keep it, since starlette's middleware adds the CORS headers.
        prefixes = protected_prefixes(settings)
        app.front = lambda stack: CompletionFastPath(
            stack, gateway.handler, ApiKeyMiddleware(stack, keys=keys, prefixes=prefixes)
        )
    # Outermost, around FastAPI's own error middleware: the request id is set before any other code (and
    # any log line) of the request runs, and every answer carries it, a 500 included.
    hosts = HostPolicy(settings.host, settings.allowed_hosts.replace(",", " ").split())
    return Edge(app, BrowserGuard(hosts))


def _install_error_handlers(app: FastAPI) -> None:
    async def gateway_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, GatewayError)
        return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(error_body(message, kind), status_code=error.status_code)

    async def validation_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(error_body(str(error), "invalid_request_error"), status_code=400)

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Rendered here (starlette then re-raises), logged once by the edge with the request id.
        return JSONResponse(error_body(f"internal error: {type(error).__name__}", "internal_error"), status_code=500)

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


class PortUnavailable(Exception):
    pass


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def bind_with_fallback(host: str, port: int, fallback: int | None) -> socket.socket:
    """Bind `port`; if it is taken and a fallback is allowed, bind that and say so."""
    try:
        return bind_socket(host, port)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise PortUnavailable(f"cannot listen on {host}:{port}: {error.strerror}") from error
        if fallback is None:
            raise PortUnavailable(f"port {port} on {host} is already in use; choose another with --port") from error
    try:
        sock = bind_socket(host, fallback)
    except OSError as error:
        raise PortUnavailable(
            f"ports {port} and {fallback} on {host} are both in use; choose a free one with --port"
        ) from error
    logger.warning("port %d is in use; serving on port %d instead", port, fallback)
    return sock


def serve(settings: Settings, profiles: ProfileSet, sock: socket.socket) -> None:
    app = create_app(settings, profiles)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        # JSON logs: uvicorn's loggers propagate to the root handler (app.logging_setup) instead of its own.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        access_log=False,
        # The gateway reads no client address (X-Forwarded-For has nothing to feed): one layer less per request.
        proxy_headers=False,
        # SIGTERM: stop listening, let in-flight requests finish for up to this long, then stop backends.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),
        lifespan="on",
        http=limited_protocol(settings.max_header_bytes, settings.header_timeout, settings.body_timeout),
    )
    uvicorn.Server(config).run(sockets=[sock])
