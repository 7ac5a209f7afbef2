"""A server's `grpc.health.v1` status, answered for the whole server (the empty service name)
and for each service it serves by its full name, as the health protocol expects: a check that
names a service (`grpc_health_probe -service=tandem.worker.v1.DecodeService`, a Kubernetes gRPC
probe's `service`) got NOT_FOUND when only the empty name was set."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class Health:
    """One health servicer, for one or more listeners of a process, and the services it covers."""

    def __init__(self, services: Iterable[ServiceDescriptor] = ()) -> None:
        self.servicer = health.aio.HealthServicer()
        self._names = ["", *(service.full_name for service in services)]

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        """SERVING or NOT_SERVING for the server and each of its services."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self.servicer.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every name, and no further changes (the server is stopping)."""
        await self.servicer.enter_graceful_shutdown()
