"""The proto <-> domain tables stay in step with the wire contract."""

from __future__ import annotations

import msgspec

from services.common.convert import CONSTRAINT_FIELDS, SAMPLING_SCALARS, prompt_from_proto, sampling_to_dict
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.worker.v1 import worker_pb2
from shared.inputs import Prompt
from shared.sampling.params import SamplingParams


def test_sampling_scalars_are_the_protos_scalar_fields() -> None:
    fields = common_pb2.SamplingParams.DESCRIPTOR.fields
    other = {"stop", "stop_token_ids", *CONSTRAINT_FIELDS}
    assert sorted(SAMPLING_SCALARS) == sorted(f.name for f in fields if f.name not in other)
    assert CONSTRAINT_FIELDS == ("json_schema", "regex", "ebnf", "structural_tag")


def test_every_set_field_reaches_the_engine_params() -> None:
    proto = common_pb2.SamplingParams(
        max_new_tokens=5, temperature=0.5, seed=3, stop=["x"], stop_token_ids=[2]
    )
    params = SamplingParams.from_dict(sampling_to_dict(proto))  # unknown names would raise
    assert (params.max_new_tokens, params.temperature, params.seed) == (5, 0.5, 3)
    assert params.stop == ["x"] and params.stop_token_ids == [2]
    assert sampling_to_dict(common_pb2.SamplingParams()) == {}  # unset stays unset: engine defaults


def test_a_constraint_reaches_the_engine_params() -> None:
    for name in CONSTRAINT_FIELDS:
        proto = common_pb2.SamplingParams(**{name: "x"})
        params = SamplingParams.from_dict(sampling_to_dict(proto))
        assert getattr(params, name) == "x"


def test_a_worker_request_becomes_the_engine_prompt() -> None:
    request = worker_pb2.GenerateRequest(
        rid="r",
        token_ids=[5, 6, 7],
        sampling_params=common_pb2.SamplingParams(max_new_tokens=4, stop=["x"]),
        return_logprob=True,
        top_logprobs_num=2,
    )
    prompt = prompt_from_proto(request)
    assert prompt == Prompt([5, 6, 7], {"max_new_tokens": 4, "stop": ["x"]}, True, 2)
    # It crosses to the engine process as it is.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(prompt), type=Prompt) == prompt
    assert prompt_from_proto(worker_pb2.GenerateRequest(token_ids=[1])) == Prompt([1], {}, False, 0)
