"""Programmatic dependent launch (PDL) for the decode step's kernels, Hopper and later.

A decode step at a small batch is a chain of a few hundred short kernels (norm, GEMV, rotary,
KV store, attention's two stages, per layer). Launched the ordinary way, each starts only once
the one before it has finished: the GPU idles while the next grid is set up and its programs
are placed. With PDL the next kernel is launched while the previous one still runs its last
programs, and each of its programs waits, before its first global memory access, until the
previous grid has finished and its writes are visible (`griddepcontrol.wait`). The kernels'
arithmetic is unchanged: only their start moves.

The protocol every taking-part kernel follows (`wait` and `release` below):

- `wait(USE_PDL)` first, before any load or store, unconditionally in every program (a program
  that returned before it could let a later kernel run ahead of an earlier one);
- `release(USE_PDL)` just after it: the next kernel may be launched once every program of this
  one has started (its programs then sit in their own wait until this grid is done).

A kernel that does not take part (cuBLAS, torch's own) is launched as before, and the stream's
order holds around it: a PDL launch after it waits for it in full, and it waits in full for a
PDL kernel before it. CUDA-graph capture records the same edges, so graphs replay them.

An engine on CUDA turns it on (`EngineConfig.disable_pdl` keeps it off; measured in
docs/benchmarks.md r26); outside an engine it is off unless `enable()`d.
`launch_options(tensor)` gives a launch's keyword arguments: `USE_PDL` for the kernel
and Triton's `launch_pdl`, both off unless PDL is enabled, the tensor is on an NVIDIA device of
compute capability 9 or later, Triton has grid dependency control, and the kernels are compiled
(the interpreter has no `griddepcontrol`). With USE_PDL off the kernels compile to what they
were without this module.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.config import interpreting

_enabled = False


def enable(on: bool = True) -> None:
    """Launch the taking-part kernels with PDL from now on (graphs captured before keep theirs)."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@functools.cache
def _supported(device_index: int) -> bool:
    """An NVIDIA GPU of compute capability 9 or later, and a Triton that has grid dependency
    control (3.4 on; `launch_pdl` came with it). Not ROCm, whose capability numbers differ."""
    has_gdc = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
    return has_gdc and torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


_ON = {"USE_PDL": True, "launch_pdl": True}
_OFF = {"USE_PDL": False}


def launch_options(t: torch.Tensor) -> dict[str, bool]:
    """The keyword arguments of a taking-part kernel's launch on t's device (not to be mutated)."""
    if not _enabled:  # the default: one check per launch
        return _OFF
    on = (
        t.is_cuda
        and not interpreting()
        and _supported(t.device.index if t.device.index is not None else torch.cuda.current_device())
    )
    return _ON if on else _OFF


@triton.jit
def wait(USE_PDL: tl.constexpr):
    """Until the kernel before this one on the stream has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release(USE_PDL: tl.constexpr):
    """Let the next kernel on the stream be launched (once every program here has called this)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
