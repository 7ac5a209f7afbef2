"""A process that must not outlive the one that started it: Linux's PR_SET_PDEATHSIG.

Used by the services `tandem up` starts (services/common/parent.py), tensor-parallel followers
(shared/distributed/launch.py) and the engine process (shared/engine_process.py). The kernel
sends the signal when the *thread* that started this process ends, which is its process's end
only where that thread was the main one.
"""

from __future__ import annotations

import contextlib
import ctypes

_PR_SET_PDEATHSIG = 1


def signal_on_parent_death(sig: int) -> None:
    """Ask the kernel for `sig` when the starting thread ends; nothing where that cannot be asked
    (not Linux): the callers each have a slower way to notice."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, sig)
