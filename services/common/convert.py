"""Proto <-> domain conversion shared by the router and the workers."""

from __future__ import annotations

from typing import Any

from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.worker.v1 import worker_pb2
from shared.errors import InvalidRequest
from shared.inputs import Prompt
from shared.outputs import RequestOutput

# The router's public contract (router.v1): the samples a request may ask for and the top
# logprobs a token may carry. The gateway's OpenAI limits are these.
MAX_N = 16
MAX_TOP_LOGPROBS = 20

SAMPLING_SCALARS = (  # the scalar fields of common.v1.SamplingParams
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "ignore_eos",
    "seed",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
)

# The members of SamplingParams' `constraint` oneof; the engine's params use the same names.
CONSTRAINT_FIELDS = tuple(
    f.name for f in common_pb2.SamplingParams.DESCRIPTOR.oneofs_by_name["constraint"].fields
)

_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def sampling_to_dict(params: common_pb2.SamplingParams) -> dict[str, Any]:
    """Only the fields the caller set: the engine applies its defaults to the rest."""
    out: dict[str, Any] = {name: getattr(params, name) for name in SAMPLING_SCALARS if params.HasField(name)}
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    constraint = params.WhichOneof("constraint")
    if constraint is not None:
        out[constraint] = getattr(params, constraint)
    return out


def prompt_from_proto(request: worker_pb2.GenerateRequest) -> Prompt:
    """A worker's `GenerateRequest` (on every role's path: unified, prefill's inner request,
    decode) as the engine's `Prompt`."""
    return Prompt(
        list(request.token_ids),
        sampling_to_dict(request.sampling_params),
        request.return_logprob,
        request.top_logprobs_num,
    )


def finish_to_proto(reason: dict[str, Any]) -> common_pb2.Finish:
    finish = common_pb2.Finish(reason=_FINISH.get(reason["type"], common_pb2.FINISH_REASON_UNSPECIFIED))
    matched = reason.get("matched")
    if isinstance(matched, int):
        finish.matched_token_id = matched
    elif isinstance(matched, str):
        finish.matched_stop = matched
    if reason.get("message"):
        finish.message = reason["message"]
    return finish


def output_to_proto(out: RequestOutput, index: int = 0) -> common_pb2.Output:
    msg = common_pb2.Output(
        index=index,
        token_ids=out.new_ids,
        text=out.new_text,
        usage=common_pb2.Usage(
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
        ),
    )
    if out.new_logprobs:
        tops = out.new_top_logprobs or [[] for _ in out.new_logprobs]
        for token, logprob, top in zip(out.new_ids, out.new_logprobs, tops):
            msg.logprobs.add(
                token_id=token,
                logprob=logprob,
                top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=v) for v, t in top],
            )
    if out.finished and out.finish_reason is not None:
        msg.finish.CopyFrom(finish_to_proto(out.finish_reason))
    return msg


_POOLING = {
    common_pb2.POOLING_UNSPECIFIED: "last",
    common_pb2.POOLING_LAST: "last",
    common_pb2.POOLING_MEAN: "mean",
}


def embed_options_to_dict(options: common_pb2.EmbedOptions) -> dict[str, Any]:
    """The engine's pooling options (shared/pooling.py's `PoolingParams` fields)."""
    if options.pooling not in _POOLING:
        raise InvalidRequest(f"unknown pooling {options.pooling}", param="pooling")
    return {
        "pooling": _POOLING[options.pooling],
        "normalize": options.normalize if options.HasField("normalize") else True,
        "dimensions": options.dimensions or None,
    }


def embedding_to_proto(index: int, out: RequestOutput) -> common_pb2.Embedding:
    return common_pb2.Embedding(
        index=index,
        values=out.embedding or [],
        prompt_tokens=out.prompt_tokens,
        cached_tokens=out.cached_tokens,
    )
