"""Starting, watching and stopping the tensor-parallel rank processes of one node.

Rank 0 is the engine process: before building its core it opens the group's store and starts the
other ranks of its node (`start_ranks`). With `nnodes > 1` the worker of every other node starts
that node's ranks (`start_node_ranks`), which meet rank 0's store at `dist_init_addr`.

Followers are plain subprocesses (`python -m shared.distributed.follower`): the engine process is
itself a daemonic multiprocessing child, which may not start multiprocessing children. Each gets
the `EngineConfig` as JSON, its rank and the store's port, joins the group, builds its
`ModelRunner` and follows rank 0's steps. The kernel kills a follower when the process that
started it dies (`die_with_parent`), so no rank outlives its node's engine or worker: another
node's worker killed while the group idles leaves no rank behind still waiting for a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import shared
from shared.config import EngineConfig
from shared.parent_death import signal_on_parent_death

if TYPE_CHECKING:  # torch: the engine and follower processes only
    import torch.distributed as dist

logger = logging.getLogger(__name__)

_STOP_WAIT_S = 10.0
_PARENT_ENV = "TANDEM_TP_PARENT_PID"  # set for each follower: the process it must not outlive
_CONFIG_KEY = "tandem_engine_config"
# What each node keeps of its own options; every other option is rank 0's (`group_config`).
_NODE_OPTIONS = ("model_path", "tokenizer_path", "device", "base_gpu_id", "node_rank", "debug_invariants")


class Followers:
    """The processes of this node's follower `ranks`, meeting rank 0's store at `port`."""

    def __init__(self, config: EngineConfig, port: int, ranks: range) -> None:
        payload = json.dumps(dataclasses.asdict(config))
        # The followers import the same `shared` package as this process, wherever it lives.
        root = str(Path(shared.__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, _PARENT_ENV: str(os.getpid())}
        self.ranks = list(ranks)
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "shared.distributed.follower", str(rank), str(port), payload],
                env=env,
            )
            for rank in self.ranks
        ]

    def exit_codes(self) -> dict[int, int]:
        """The exit status of each rank whose process has exited."""
        return {rank: code for rank, p in zip(self.ranks, self.processes) if (code := p.poll()) is not None}

    def dead(self) -> list[int]:
        """Ranks whose process has exited."""
        return list(self.exit_codes())

    def stop(self, graceful: bool) -> None:
        """Reap the followers: after rank 0 broadcast the stop (`graceful`), give them a moment to
        leave their loop; otherwise (the group is broken) kill them at once."""
        for p in self.processes:
            if graceful:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(_STOP_WAIT_S)
            if p.poll() is None:
                if graceful:
                    logger.warning("follower rank process %d did not stop; killing it", p.pid)
                p.kill()
                p.wait()


def start_ranks(config: EngineConfig) -> Followers | None:
    """Rank 0, before building its core: refuse a model this slice cannot shard, open the store,
    start the followers of node 0 and join the group (it forms once every node's ranks joined).
    None (nothing started) at `tp_size == 1`."""
    if config.tp_size == 1:
        return None
    import torch.distributed as dist  # torch: the engine process only

    from shared.distributed import parallel_state
    from shared.model_runner import resolve_device
    from shared.models.config import ModelConfig

    model = ModelConfig.from_model_path(config.model_path)
    if config.enable_dp_attention:
        from shared.distributed import dp_attention

        dp_attention.check_support(model, config.tp_size, config.ep_size)
    else:
        parallel_state.check_tp_support(model, config.tp_size, config.ep_size)
    device = resolve_device(config.device, config.base_gpu_id, 0)
    store = parallel_state.open_rendezvous(config.tp_size, config.rendezvous[1], config.dist_timeout)
    store.set(_CONFIG_KEY, json.dumps(dataclasses.asdict(config)))
    followers = Followers(config, store.port, config.node_ranks[1:])
    try:
        parallel_state.init_tensor_parallel(
            0, config.tp_size, store, device, config.ep_size, config.dist_timeout
        )
    except BaseException as e:
        followers.stop(graceful=False)
        if isinstance(e, dist.DistStoreError):  # a rank never joined
            raise RuntimeError(_missing_ranks(config, e)) from e
        raise
    return followers


def _missing_ranks(config: EngineConfig, e: Exception) -> str:
    message = f"not every tensor-parallel rank joined within --dist-timeout {config.dist_timeout} s"
    if config.nnodes > 1:
        message += (
            f"; is the worker running on every node (--node-rank 1..{config.nnodes - 1}, --nnodes"
            f" {config.nnodes}, --dist-init-addr {config.dist_init_addr}) and can it reach this one?"
        )
    return f"{message} ({e})"


def start_node_ranks(config: EngineConfig) -> Followers:
    """A node other than node 0 (`node_rank > 0`): start its ranks, which join rank 0's group at
    `dist_init_addr` and follow its steps until it stops them or the group breaks."""
    if config.node_rank == 0:
        raise ValueError("node 0's ranks are started by its engine process (start_ranks)")
    return Followers(config, config.rendezvous[1], config.node_ranks)


def group_config(store: dist.Store, config: EngineConfig) -> EngineConfig:
    """A rank on another node than rank 0: rank 0's options (the pool and model shapes, dtypes and
    quantization every rank must agree on), keeping this node's own paths, devices and node rank.
    A difference is logged, not fatal: the group runs as node 0 says."""
    group = json.loads(store.get(_CONFIG_KEY))
    mine = dataclasses.asdict(config)
    layout = ("tp_size", "nnodes")  # what this node's rank numbers came from
    if any(group[k] != mine[k] for k in layout):
        raise ValueError(
            f"node {config.node_rank} has tp_size={config.tp_size}, nnodes={config.nnodes} but node 0"
            f" tp_size={group['tp_size']}, nnodes={group['nnodes']}: start every node with the same ones"
        )
    differ = sorted(k for k in group if k not in _NODE_OPTIONS and group[k] != mine.get(k))
    if differ:
        logger.warning("options that differ from node 0's are taken from node 0: %s", ", ".join(differ))
    return EngineConfig(**{**group, **{k: mine[k] for k in _NODE_OPTIONS}})


def die_with_parent() -> None:
    """A follower, first thing: get SIGKILL when the process that started it dies (Linux), and
    exit now if it already has."""
    parent = os.environ.pop(_PARENT_ENV, None)
    if parent is None:  # started by hand
        return
    signal_on_parent_death(signal.SIGKILL)  # not Linux: a dead peer still breaks the next collective
    if os.getppid() != int(parent):
        sys.exit("the process that started this tensor-parallel rank is gone; exiting")
