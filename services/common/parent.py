"""Services started by `tandem up` die with it.

The launcher sets `TANDEM_PARENT_PID` in each child's environment and the child, at start, asks
the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG). The launcher cannot do this
between fork and exec itself: a `preexec_fn` makes subprocess fork the whole launcher, whose
open gRPC channels have fork handlers that can abort the child before it execs (seen as
"epoll_wait error: Bad file descriptor" or "pthread_create failed" in the child's log).
"""

from __future__ import annotations

import os
import signal
import sys

from shared.parent_death import signal_on_parent_death

PARENT_ENV = "TANDEM_PARENT_PID"


def die_with_launcher() -> None:
    """If started by the launcher, get SIGTERM when it dies (exit now if it already has)."""
    parent = os.environ.pop(PARENT_ENV, None)  # not inherited by what this service starts
    if parent is None:
        return
    signal_on_parent_death(signal.SIGTERM)  # elsewhere than Linux the launcher's stop still works
    if os.getppid() != int(parent):  # the launcher died before we asked
        sys.exit("tandem up is gone; exiting")
