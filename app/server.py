"""The ASGI app factory and the process that serves it."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.auth import ApiKeyMiddleware, load_keys, protected_prefixes, reload_keys
from app.browser_guard import BrowserGuard, HostPolicy
from app.completion_endpoint import CompletionEndpoint
from app.edge import Edge
from app.error_response import as_gateway_error, error_response
from app.errors import GatewayError
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


def create_app(settings: Settings, profiles: ProfileSet) -> Edge:
    """Build the app: edge (app/edge.py) -> completion endpoint (app/completion_endpoint.py) -> FastAPI.
    Nothing starts until the ASGI lifespan does."""
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

    api = FastAPI(title="specgate", version="0.1.0", lifespan=lifespan)
    api.state.gateway = gateway
    api.include_router(router)
    api.include_router(logs_router)
    install_metrics(api, gateway)
    api.include_router(metrics_router)
    install_status(api, gateway)
    api.include_router(status_router)
    _install_error_handlers(api)
    prefixes = protected_prefixes(settings)
    api.add_middleware(ApiKeyMiddleware, keys=keys, prefixes=prefixes)
    # The completion endpoints' one entry, in front of FastAPI's stack (fewer layers per token), with the
    # same key check (the same live key list, which SIGHUP rotates in place).
    completions = CompletionEndpoint(api, gateway.handler, ApiKeyMiddleware(api, keys=keys, prefixes=prefixes))
    # Outermost, around FastAPI's own error middleware: the request id is set before any other code (and
    # any log line) of the request runs, and every answer carries it, a 500 included; CORS there covers
    # every route alike.
    hosts = HostPolicy(settings.host, settings.allowed_hosts.replace(",", " ").split())
    origins = [origin for origin in settings.cors_origins.replace(",", " ").split() if origin]
    return Edge(completions, BrowserGuard(hosts), origins)


def _install_error_handlers(app: FastAPI) -> None:
    async def render(request: Request, error: Exception) -> Response:
        # A bug (Exception) is rendered here, then starlette re-raises it to the edge, which logs it once
        # with the request id.
        return error_response(as_gateway_error(error, request.method, request.url.path))

    for caught in (GatewayError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(caught, render)


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
        http=limited_protocol(
            settings.max_header_bytes, settings.header_timeout, settings.body_timeout, settings.client_write_timeout
        ),
    )
    uvicorn.Server(config).run(sockets=[sock])
