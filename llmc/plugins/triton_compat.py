"""What every Triton module here shares: whether the interpreter runs the kernels, and a fix for it.

``TRITON_INTERPRET=1`` (CPU tests) must be set before triton is first imported; kernels read ``INTERPRET``
to pick interpreter-safe variants (the 16-bit dot and fp8 rounding quirks are noted where they matter).
"""
from __future__ import annotations

import os

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
