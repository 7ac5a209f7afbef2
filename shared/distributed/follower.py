"""A follower rank's process: join the group, build this rank's model and KV shard, follow rank 0.

    python -m shared.distributed.follower RANK STORE_PORT CONFIG_JSON

Started by rank 0 for the other ranks of its node, or by the worker of another node, whose ranks
then take node 0's options (shared/distributed/launch.py). It holds no scheduler, cache or
sampler: it runs the forwards rank 0 broadcasts (shared/distributed/step_sync.py), and in a
prefill/decode engine its shard's part of each KV transfer (shared/transfer/shards.py), until
rank 0 says stop, or exits with an error when a collective fails because another rank died.
With DP attention it runs an engine of its own instead (shared/distributed/dp_engine.py).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING

from shared.config import EngineConfig
from shared.distributed import parallel_state
from shared.distributed.launch import die_with_parent, group_config
from shared.process_exit import exit_without_teardown

if TYPE_CHECKING:
    import torch

    from shared.model_runner import ModelRunner
    from shared.transfer.shard_follower import FollowerTransfer

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    die_with_parent()
    rank, port, payload = int(argv[0]), int(argv[1]), argv[2]
    config = EngineConfig(**json.loads(payload))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{rank} %(levelname)s %(message)s")
    from shared.model_runner import ModelRunner, resolve_device

    device = resolve_device(config.device, config.base_gpu_id, config.local_rank(rank))
    store = parallel_state.join_rendezvous(port, config.tp_size, config.rendezvous[0], config.dist_timeout)
    if config.node_rank > 0:
        config = group_config(store, config)
    parallel_state.init_tensor_parallel(
        rank, config.tp_size, store, device, config.ep_size, config.dist_timeout
    )
    try:
        if config.enable_dp_attention:  # an engine of its own (shared/distributed/dp_engine.py)
            from shared.distributed.dp_engine import serve_follower

            serve_follower(config, rank)
        else:
            runner = ModelRunner(config)
            runner.follow(_transfer(config, runner, rank, device))
    except Exception as e:  # a dead peer, or a failure of our own: either way the group is gone
        logger.error("tensor-parallel rank %d stops: %s: %s", rank, type(e).__name__, e)
        return 1
    finally:
        parallel_state.destroy_tensor_parallel()
    return 0


def _transfer(
    config: EngineConfig, runner: ModelRunner, rank: int, device: torch.device
) -> FollowerTransfer | None:
    """A prefill/decode engine's follower moves its own KV shard (shared/transfer/shards.py)."""
    if config.disaggregation_mode == "null":
        return None
    from shared.transfer.pages import PageLayout
    from shared.transfer.shard_follower import FollowerTransfer

    layout = PageLayout(runner.kv_pool.buffers(), config.page_size)
    return FollowerTransfer(layout, config.disaggregation_mode, rank, config.tp_size, device)


if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))
