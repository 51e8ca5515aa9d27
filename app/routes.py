"""HTTP routes. Handlers are thin: the work lives in the proxy and the pool."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.errors import ModelNotFound
from app.gateway import Gateway
from app.openapi_schemas import CHAT_COMPLETION, TEXT_COMPLETION

router = APIRouter()


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# The completion endpoints, for the OpenAPI description (`/openapi.json`, `/docs`) only: their requests are
# served by app/completion_endpoint.py, in front of this app, and never reach these routes.
@router.post("/v1/chat/completions", openapi_extra=CHAT_COMPLETION)
async def chat_completions() -> Response:
    raise RuntimeError("served by app/completion_endpoint.py; this route only documents it")


@router.post("/v1/completions", openapi_extra=TEXT_COMPLETION)
async def completions() -> Response:
    raise RuntimeError("served by app/completion_endpoint.py; this route only documents it")


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    gateway = _gateway(request)
    return {"object": "list", "data": [gateway.describe_profile(name) for name in gateway.profiles.names()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request) -> dict[str, Any]:
    gateway = _gateway(request)
    profile = gateway.profiles.get(name)
    if profile is None:
        raise ModelNotFound(f"model {name!r} does not exist", param="model")
    return gateway.describe_profile(profile.name)


@router.get("/health")
async def health(request: Request) -> Response:
    gateway = _gateway(request)
    return JSONResponse({"status": "ok", "profiles": len(gateway.profiles), "backends": gateway.backend_summary()})
