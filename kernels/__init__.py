"""Triton kernels of mtbkd (installed as ``mtbkd.kernels``).

Importing the package registers the ``triton`` backend of the custom ops in :mod:`mtbkd.ops`:
:mod:`.losses` (the fused multi-teacher losses, teacher statistics, gradient scaling) and, when
present, :mod:`.bayes` (Bayesian sampling kernels). The kernels run on CUDA tensors, or on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests run them without a
GPU.
"""

from __future__ import annotations

import importlib.util
import os


def _interpreter_compat() -> None:
    # Triton 3.6's interpreter converts 1-element scalar arrays with int(), which NumPy >= 2.4
    # rejects for arrays of ndim > 0 (triton-lang/triton#9171): loops with a runtime bound fail.
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_mtbkd_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mtbkd_compat = True
    interp._patch_lang_tensor = patched


# triton.jit reads TRITON_INTERPRET when the kernels below are defined (mtbkd.ops checks this).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    _interpreter_compat()

from . import losses  # noqa: E402,F401  (registers the triton implementations)

if importlib.util.find_spec(f"{__name__}.bayes") is not None:
    from . import bayes  # noqa: F401
