"""What every Triton module here shares: whether the interpreter runs the kernels (and a fix for it), and
programmatic dependent launch.

``TRITON_INTERPRET=1`` (CPU tests) must be set before triton is first imported; kernels read ``INTERPRET``
to pick interpreter-safe variants (the 16-bit dot and fp8 rounding quirks are noted where they matter).
"""
from __future__ import annotations

import functools
import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element numpy array) into a loop bound with ``int()``,
    which numpy >= 2.3 refuses for 1-d arrays; data-dependent loop bounds then fail under the interpreter.
    Take the single element instead (interpreter only: compiled kernels are untouched)."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:  # pragma: no cover
        return
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_llmc_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._llmc_fixed = True
    ti._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_scalar_index()


def row_warps(block: int) -> int:
    """Warps for a kernel that holds one ``block``-wide row in registers (a norm, SwiGLU or quantization of
    a decode row): about 32 values per thread at the widest, so the row never spills."""
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


# ---------------------------------------------------------------------------- programmatic dependent launch
# On Hopper (sm_90+) a kernel launched with PDL may start while the previous one finishes: its programs are
# placed on the SMs the tail of the previous grid leaves idle and wait there (``griddepcontrol.wait``) for it
# to complete, so a decode step of ~330 small launches stops paying each launch's ramp and tail in turn.
# Every kernel here calls ``pdl_wait`` before it reads anything an earlier kernel wrote or writes anything,
# which keeps the chain ordered (each one completes only after its predecessor did). Switchable for
# before/after measurements (benchmarks/decode_latency.py --no-pdl).
PDL: dict[str, bool] = {"enabled": True}


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_args(t) -> dict:
    """Launch keywords for a kernel taking ``PDL: tl.constexpr``: PDL on for a CUDA tensor on sm_90+."""
    on = PDL["enabled"] and not INTERPRET and t.is_cuda and _sm90(t.device.index or 0)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Let the next kernel launch now, then wait until the previous one has completed and its writes are
    visible (no-ops without PDL). Call it before touching anything but constant weights."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
