"""Keys and the private control plane, over real processes on loopback: a router with two API
keys (one from a flag, one from a file) and a cluster token, a prefill and a decode worker
holding the token (gRPC KV transport: every prefill -> decode call is a gRPC call), a worker of
another model that is not registered, and the gateway (in this process) with keys of its own.
Health and server reflection stay open on every gRPC listener."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.common.auth import bearer
from services.common.kv_stream import WRITE_KV_METHOD
from services.gateway import GatewayConfig
from services.launcher import free_port
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.gateway.conftest import GatewayThread
from tests.suite.cluster import Cluster, Service, collect

pytestmark = pytest.mark.xdist_group("suite_auth")

ROUTER_KEYS = ("router-key-flag", "router-key-file")
TOKEN = "the-cluster-token"
GATEWAY_KEYS = ("gateway-key-1", "gateway-key-2")


@dataclass
class Suite:
    cluster: Cluster
    prefill: Service
    decode: Service
    stranger: Service  # serves "another-model"; never registered
    admin_http: str
    gateway: GatewayThread


@pytest.fixture(scope="module")
def suite(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    tmp = tmp_path_factory.mktemp("auth")
    key_file = tmp / "keys"
    key_file.write_text(f"# router keys\n\n{ROUTER_KEYS[1]}\n")
    with Cluster(tiny_llama, tmp, cluster_token=TOKEN) as cluster:
        http_port = free_port()
        cluster.start_router(
            *("--api-key", ROUTER_KEYS[0], "--api-key-file", str(key_file)),
            *("--admin-http-port", str(http_port)),
        )
        # It loads alongside the others; not registered (no --router).
        (stranger,) = cluster.start_workers([("unified", "--served-model-name", "another-model")], False)
        prefill, decode = cluster.start_workers(
            [("prefill", "--kv-transport", "grpc"), ("decode", "--kv-transport", "grpc")]
        )
        cluster.wait(lambda: _health(stranger.address) == health_pb2.HealthCheckResponse.SERVING, "unified-0")
        config = GatewayConfig(
            router=cluster.router,
            tokenizer=str(tiny_llama),
            api_keys=GATEWAY_KEYS,
            router_api_key=ROUTER_KEYS[1],
        )
        gateway = GatewayThread(config).start()
        try:
            yield Suite(cluster, prefill, decode, stranger, f"http://127.0.0.1:{http_port}", gateway)
        finally:
            gateway.stop()


def _health(address: str, service: str = "") -> int | None:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
        except grpc.RpcError:
            return None
        return int(reply.status)


def _code(call: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=10, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)  # a server stream fails on its first read
    return info.value.code()  # type: ignore[no-any-return, attr-defined]


NO_SECRET: list[tuple[str, str]] = []
WRONG = [bearer("wrong")]


# ---- the router's public port -------------------------------------------------------------------


def test_router_public_api_wants_an_api_key(suite: Suite) -> None:
    stub = suite.cluster.stub
    request = suite.cluster.request(token_ids=[5, 6, 7], max_new_tokens=2)
    for metadata in (NO_SECRET, WRONG, [bearer(TOKEN)]):  # the cluster token is no API key
        assert _code(stub.Generate, request, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            _code(stub.ListModels, router_pb2.ListModelsRequest(), metadata=metadata)
            == grpc.StatusCode.UNAUTHENTICATED
        )
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(router_pb2.TokenizeRequest(text="hi"), timeout=10)
    assert info.value.details() == (  # type: ignore[attr-defined]
        "this endpoint needs an API key: send metadata 'authorization: Bearer <API key>'"
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(router_pb2.TokenizeRequest(text="hi"), timeout=10, metadata=WRONG)
    # One article (a QA pass read "the the cluster token" and "the an API key").
    assert info.value.details() == "the API key sent in 'authorization' is not valid here"  # type: ignore[attr-defined]
    assert _health(suite.cluster.router) == health_pb2.HealthCheckResponse.SERVING  # probes stay open


@pytest.mark.parametrize("key", ROUTER_KEYS)
def test_router_serves_pd_with_each_key(suite: Suite, key: str) -> None:
    # Router -> workers and prefill -> decode (ReserveKv, WriteKv) carry the cluster token.
    request = suite.cluster.request(
        token_ids=[5, 6, 7, 8], max_new_tokens=4, temperature=0.0, ignore_eos=True
    )
    responses = list(suite.cluster.stub.Generate(request, timeout=60, metadata=[bearer(key)]))
    sample = collect(responses)[0]
    assert len(sample["ids"]) == 4
    assert sample["route"].prefill_worker == suite.prefill.address
    assert sample["route"].decode_worker == suite.decode.address


def test_admin_service_is_not_on_the_public_port(suite: Suite) -> None:
    admin = router_pb2_grpc.RouterAdminServiceStub(suite.cluster._channel)
    for metadata in ([bearer(ROUTER_KEYS[0])], [bearer(TOKEN)]):
        register = router_pb2.RegisterWorkerRequest(address=suite.stranger.address)
        assert _code(admin.RegisterWorker, register, metadata=metadata) == grpc.StatusCode.UNIMPLEMENTED
        drain = router_pb2.DrainWorkerRequest(address=suite.decode.address)
        assert _code(admin.DrainWorker, drain, metadata=metadata) == grpc.StatusCode.UNIMPLEMENTED


# ---- the admin port -----------------------------------------------------------------------------


def test_admin_port_wants_the_cluster_token(suite: Suite) -> None:
    admin = suite.cluster.admin
    for metadata in (NO_SECRET, WRONG, [bearer(ROUTER_KEYS[0])]):  # an API key is no cluster token
        request = router_pb2.ListWorkersRequest()
        assert _code(admin.ListWorkers, request, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED
        drain = router_pb2.DrainWorkerRequest(address=suite.decode.address)
        assert _code(admin.DrainWorker, drain, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED
    workers = admin.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5, metadata=[bearer(TOKEN)]).workers
    assert {w.address for w in workers} == {suite.prefill.address, suite.decode.address}
    assert all(w.state == router_pb2.WORKER_STATE_HEALTHY for w in workers)  # nothing was drained
    assert _health(suite.cluster.admin_address) == health_pb2.HealthCheckResponse.SERVING
    for service in ("tandem.router.v1.RouterService", "tandem.router.v1.RouterAdminService"):
        assert _health(suite.cluster.admin_address, service) == health_pb2.HealthCheckResponse.SERVING
        assert _health(suite.cluster.router, service) == health_pb2.HealthCheckResponse.SERVING


def test_admin_http_wants_the_cluster_token(suite: Suite) -> None:
    with httpx.Client(base_url=suite.admin_http, timeout=10) as http:
        assert http.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            assert http.get("/workers", headers=headers).status_code == 401
            drain = http.post(f"/workers/{suite.decode.address}/drain", headers=headers)
            assert drain.status_code == 401
            add = http.post("/workers", json={"address": suite.stranger.address}, headers=headers)
            assert add.status_code == 401
        listed = http.get("/workers", headers={"Authorization": f"Bearer {TOKEN}"})
        assert listed.status_code == 200 and len(listed.json()["workers"]) == 2


def test_registering_a_worker_of_another_model_is_refused(suite: Suite) -> None:
    request = router_pb2.RegisterWorkerRequest(address=suite.stranger.address)
    with pytest.raises(grpc.RpcError) as info:
        suite.cluster.admin.RegisterWorker(request, timeout=10, metadata=[bearer(TOKEN)])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "another-model" in info.value.details()  # type: ignore[attr-defined]
    assert suite.stranger.address not in {w.address for w in suite.cluster._list_workers() or []}


# ---- workers ------------------------------------------------------------------------------------


def test_workers_refuse_calls_without_the_cluster_token(suite: Suite) -> None:
    generate = worker_pb2.GenerateRequest(rid="x", token_ids=[5, 6, 7])
    prefill = worker_pb2.PrefillRequest(request=generate, decode_address="127.0.0.1:1")
    for metadata in (NO_SECRET, WRONG, [bearer(ROUTER_KEYS[0])]):
        with grpc.insecure_channel(suite.prefill.address) as channel:
            stub = worker_pb2_grpc.PrefillServiceStub(channel)
            assert _code(stub.Prefill, prefill, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(suite.decode.address) as channel:
            decode = worker_pb2_grpc.DecodeServiceStub(channel)
            assert _code(decode.Generate, generate, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED
            reserve = worker_pb2.ReserveKvRequest(rid="x")
            assert _code(decode.ReserveKv, reserve, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED
            write_kv = channel.stream_unary(WRITE_KV_METHOD)  # raw bytes: garbage is refused unread
            assert (
                _code(write_kv, iter([b"\xff\x00garbage"]), metadata=metadata)
                == grpc.StatusCode.UNAUTHENTICATED
            )
            info = worker_pb2_grpc.WorkerServiceStub(channel)
            assert (
                _code(info.GetLoad, worker_pb2.GetLoadRequest(), metadata=metadata)
                == grpc.StatusCode.UNAUTHENTICATED
            )
        with grpc.insecure_channel(suite.stranger.address) as channel:
            unified = worker_pb2_grpc.WorkerServiceStub(channel)
            assert _code(unified.Generate, generate, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED
    for worker in (suite.prefill, suite.decode, suite.stranger):  # the router's probes stay open
        assert _health(worker.address) == health_pb2.HealthCheckResponse.SERVING
    # By service name too (grpc_health_probe -service, a Kubernetes probe's `service`): NOT_FOUND
    # (None here) before, for every name but the empty one.
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _health(suite.decode.address, "tandem.worker.v1.DecodeService") == serving
    assert _health(suite.prefill.address, "tandem.worker.v1.PrefillService") == serving
    assert _health(suite.stranger.address, "tandem.worker.v1.WorkerService") == serving
    assert _health(suite.decode.address, "tandem.worker.v1.PrefillService") is None  # not served there
    # The token opens them (GetLoad: nothing ran on the unregistered worker).
    assert suite.stranger.load().running_requests == 0


# ---- reflection: open on every listener, like health ---------------------------------------------

OPEN = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
# Each listener's own services (in package tandem.) and a method to describe.
LISTENERS = {
    "router": ({"router.v1.RouterService"}, "router.v1.RouterService.Generate"),
    "admin": ({"router.v1.RouterAdminService"}, "router.v1.RouterAdminService.DrainWorker"),
    "prefill": ({"worker.v1.WorkerService", "worker.v1.PrefillService"}, "worker.v1.PrefillService.Prefill"),
    "decode": ({"worker.v1.WorkerService", "worker.v1.DecodeService"}, "worker.v1.DecodeService.WriteKv"),
    "unified": ({"worker.v1.WorkerService"}, "worker.v1.WorkerService.Embed"),
}


@pytest.mark.parametrize("listener", LISTENERS)
def test_reflection_lists_and_describes_services_without_a_secret(suite: Suite, listener: str) -> None:
    """What `grpcurl -plaintext ADDRESS list` and `describe` do, with no key and no token."""
    address = {
        "router": suite.cluster.router,
        "admin": suite.cluster.admin_address,
        "prefill": suite.prefill.address,
        "decode": suite.decode.address,
        "unified": suite.stranger.address,
    }[listener]
    services, method = LISTENERS[listener]
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {f"tandem.{name}" for name in services} | OPEN
        # A pool fed only by the server's answers: the schemas come over the wire.
        pool = DescriptorPool(database)
        service, _, name = f"tandem.{method}".rpartition(".")
        found = pool.FindServiceByName(service).methods_by_name[name]
        assert found.input_type.full_name == f"{service.rpartition('.')[0]}.{name}Request"
        assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]


# ---- the gateway --------------------------------------------------------------------------------


V1_CALLS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.mark.parametrize("method,path,body", V1_CALLS, ids=[c[1] for c in V1_CALLS])
def test_gateway_answers_401_without_a_valid_key(
    suite: Suite, method: str, path: str, body: dict[str, Any] | None
) -> None:
    with httpx.Client(base_url=suite.gateway.url, timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ROUTER_KEYS[0]}"}):
            resp = http.request(method, path, json=body, headers=headers)
            assert resp.status_code == 401, resp.text
            error = resp.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
            assert error["param"] is None and error["message"]
        # Probes and scrapers need no key.
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200


@pytest.mark.parametrize("key", GATEWAY_KEYS)
def test_gateway_serves_each_key_through_the_keyed_router(suite: Suite, key: str) -> None:
    client = openai.OpenAI(base_url=f"{suite.gateway.url}/v1", api_key=key, max_retries=0, timeout=60)
    (model,) = client.models.list().data
    out = client.completions.create(model=model.id, prompt="Once upon", max_tokens=3, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 3
    chat = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert chat.choices[0].message.content is not None


def test_openai_client_reports_a_wrong_key_as_authentication_error(suite: Suite) -> None:
    client = openai.OpenAI(base_url=f"{suite.gateway.url}/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.code == "invalid_api_key"
