"""Per-parameter weight loaders and the checkpoint-name -> parameter mapping shared by all models.

Every parameter carries a `weight_loader(param, loaded[, shard_id])` attribute set by the layer
that owns it: the layer knows how a checkpoint tensor maps into its storage (a q/k/v slice of a
fused projection, a tensor-parallel shard, later an FP8 scale). Models only translate names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[..., None]

# (fused parameter name part, checkpoint name part, shard id): e.g. q_proj -> slice "q" of qkv_proj.
StackedParams = list[tuple[str, str, Any]]

# Checkpoint tensors that are recomputed, never loaded.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy a whole checkpoint tensor into `param` (dtype/device cast included, shape checked)."""
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)


def set_weight_loader(param: nn.Parameter, loader: WeightLoader, shard_ids: Iterable[Any] = ()) -> None:
    """Attach `loader` to `param`; `shard_ids` lists the shards a fused parameter needs in full."""
    # setattr: nn.Parameter has no declared slot for these, and the attribute travels with it.
    setattr(param, "weight_loader", loader)  # noqa: B010
    setattr(param, "shard_ids", tuple(shard_ids))  # noqa: B010


def get_weight_loader(param: nn.Parameter) -> WeightLoader:
    """The loader a layer attached to `param`, or `default_weight_loader`."""
    loader: WeightLoader = getattr(param, "weight_loader", default_weight_loader)
    return loader


def load_named_weights(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: StackedParams,
    skip_prefixes: tuple[str, ...] = (),
) -> set[str]:
    """Load checkpoint `(name, tensor)` pairs into `module`'s parameters; return the loaded names.

    Names in `stacked` are redirected into their fused parameter with a shard id; a fused
    parameter counts as loaded only once all its shards arrived. Tensors whose name starts with
    one of `skip_prefixes` (e.g. a tied `lm_head.`) or ends with a rotary cache are ignored.
    A checkpoint tensor with no matching parameter is a `ValueError`.
    """
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    shards_seen: dict[str, set[Any]] = {}
    for name, tensor in weights:
        if name.endswith(SKIPPED_SUFFIXES) or name.startswith(skip_prefixes):
            continue
        for fused, part, shard_id in stacked:
            if f".{part}." not in name:
                continue
            param_name = name.replace(f".{part}.", f".{fused}.")
            param = _lookup(params, param_name, name)
            get_weight_loader(param)(param, tensor, shard_id)
            shards_seen.setdefault(param_name, set()).add(shard_id)
            break
        else:
            param = _lookup(params, name, name)
            get_weight_loader(param)(param, tensor)
            loaded.add(name)
    for param_name, seen in shards_seen.items():
        if seen >= set(getattr(params[param_name], "shard_ids", ())):
            loaded.add(param_name)
    return loaded


def _lookup(params: dict[str, nn.Parameter], param_name: str, checkpoint_name: str) -> nn.Parameter:
    if param_name not in params:
        raise ValueError(f"checkpoint tensor {checkpoint_name!r} matches no model parameter")
    return params[param_name]
