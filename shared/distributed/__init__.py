"""Tensor parallelism on torch.distributed: the rank group, the per-step broadcast, the followers.

    parallel_state  this process's rank and group; the collectives the layers call
    step_sync       what rank 0 broadcasts before each forward, and how followers read it
    launch          rank 0 starting (and stopping) its follower processes
    follower        a follower rank's entry point and loop

See docs/architecture.md, "Tensor parallelism".
"""
