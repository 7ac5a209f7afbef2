"""gRPC server reflection on every listener, so generic clients (grpcurl, grpcui, Postman) list a
port's services and fetch their schemas without the .proto files:

    add_reflection(server, router_pb2.DESCRIPTOR.services_by_name["RouterService"])
    $ grpcurl -plaintext localhost:50051 list
    grpc.health.v1.Health
    grpc.reflection.v1alpha.ServerReflection
    tandem.router.v1.RouterService

Reflection answers from the process's default descriptor pool, where the generated `*_pb2`
modules put the schemas of the services they define. It reveals schemas only (the same ones
`proto/` publishes), never data, so it is open like health: no API key or cluster token needed
(`services.common.auth.OPEN_METHODS`; docs/security.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

REFLECTION_SERVICE = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection


def add_reflection(server: grpc.aio.Server, services: Iterable[ServiceDescriptor]) -> None:
    """Serve reflection on `server`, listing `services` (the ones this listener serves), health
    (every listener has it) and reflection itself."""
    names = [s.full_name for s in services] + [health.SERVICE_NAME, REFLECTION_SERVICE]
    reflection.enable_server_reflection(names, server)
