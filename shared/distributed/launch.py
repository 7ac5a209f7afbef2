"""Rank 0 (the engine process) starting, watching and stopping its follower rank processes.

Followers are plain subprocesses (`python -m shared.distributed.follower`): the engine process is
itself a daemonic multiprocessing child, which may not start multiprocessing children. Each gets
the `EngineConfig` as JSON, its rank and the port of rank 0's rendezvous store on loopback, joins
the group, builds its `ModelRunner` and follows rank 0's steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import shared
from shared.config import EngineConfig

logger = logging.getLogger(__name__)

_STOP_WAIT_S = 10.0


class Followers:
    """The processes of ranks 1..tp_size-1, meeting rank 0 at its store on loopback `port`."""

    def __init__(self, config: EngineConfig, port: int) -> None:
        payload = json.dumps(dataclasses.asdict(config))
        # The followers import the same `shared` package as this process, wherever it lives.
        root = str(Path(shared.__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "shared.distributed.follower", str(rank), str(port), payload],
                env=env,
            )
            for rank in range(1, config.tp_size)
        ]

    def dead(self) -> list[int]:
        """Ranks whose process has exited."""
        return [rank for rank, p in enumerate(self.processes, start=1) if p.poll() is not None]

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
    """Rank 0, before building its core: refuse a model this slice cannot shard, start the
    followers and join their group. None (nothing started) at `tp_size == 1`."""
    if config.tp_size == 1:
        return None
    from shared.distributed import parallel_state  # torch: the engine process only
    from shared.model_runner import resolve_device
    from shared.models.config import ModelConfig

    model = ModelConfig.from_model_path(config.model_path)
    if config.enable_dp_attention:
        from shared.distributed import dp_attention

        dp_attention.check_support(model, config.tp_size, config.ep_size)
    else:
        parallel_state.check_tp_support(model, config.tp_size, config.ep_size)
    device = resolve_device(config.device, config.base_gpu_id, 0)
    store = parallel_state.open_rendezvous(config.tp_size)
    followers = Followers(config, store.port)
    try:
        parallel_state.init_tensor_parallel(0, config.tp_size, store, device, config.ep_size)
    except BaseException:
        followers.stop(graceful=False)
        raise
    return followers
