"""The router's admin over HTTP (for operators and scripts; the same verbs as RouterAdminService):

GET    /workers                      list workers (role, state, load)
POST   /workers   {"address": ...}   add a worker
POST   /workers/{address}/drain      stop sending it new requests
DELETE /workers/{address}            remove it
GET    /health                       200 (open: probes)

Served on the router's admin host (127.0.0.1 unless --admin-host says otherwise). With a cluster
token set, every route but /health wants `Authorization: Bearer <cluster token>` (401 otherwise).
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from services.common.auth import Secrets
from services.common.errors import status_of
from services.common.tracing import fastapi_options
from services.router.registry import Registry

_HTTP = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 409, "UNAVAILABLE": 503}


class AddWorker(BaseModel):
    address: str


_NO_TOKEN = Secrets()


def create_admin_app(registry: Registry, cluster_token: Secrets = _NO_TOKEN) -> FastAPI:
    def authorized(request: Request) -> None:
        if cluster_token.enabled and not cluster_token.check_bearer(request.headers.get("authorization")):
            raise HTTPException(
                401,
                "the router admin API needs 'Authorization: Bearer <cluster token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # Admin calls are not traced.
    app = FastAPI(title="Tandem router admin", **fastapi_options())
    guarded = [Depends(authorized)]

    def fail(e: Exception) -> HTTPException:
        code, message, _ = status_of(e)
        return HTTPException(_HTTP.get(code.name, 500), message)

    def describe() -> list[dict[str, Any]]:
        return [
            {
                "address": w.address,
                "role": w.role,
                "state": w.state,
                "model": w.info.model,
                "in_flight": w.in_flight,
                "requests_total": w.requests_total,
            }
            for w in registry.workers.values()
        ]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/workers", dependencies=guarded)
    async def list_workers() -> dict[str, Any]:
        return {"workers": describe()}

    @app.post("/workers", dependencies=guarded)
    async def add_worker(body: AddWorker) -> dict[str, Any]:
        try:
            await registry.register(body.address)
        except Exception as e:
            raise fail(e) from None
        return {"workers": describe()}

    @app.post("/workers/{address}/drain", dependencies=guarded)
    async def drain_worker(address: str) -> dict[str, Any]:
        try:
            registry.drain(address)
        except Exception as e:
            raise fail(e) from None
        return {"workers": describe()}

    @app.delete("/workers/{address}", dependencies=guarded)
    async def remove_worker(address: str) -> dict[str, Any]:
        try:
            await registry.remove(address)
        except Exception as e:
            raise fail(e) from None
        return {"workers": describe()}

    return app
