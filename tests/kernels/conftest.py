"""Kernel tests: on a machine without CUDA, Triton kernels run in the interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so this runs
before the test modules import ``eep.kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import triton.runtime.interpreter as _interp  # noqa: E402

# Triton 3.6's interpreter turns a scalar into an int with int(array), which numpy >= 2.4
# refuses for the 1-element arrays it holds (so `range(0, n)` over a kernel argument fails).
# Take the element explicitly; on GPUs the interpreter is not used and this changes nothing.
_patch_lang_tensor = _interp._patch_lang_tensor


def _patch_lang_tensor_np24(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(
        tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
    )


_interp._patch_lang_tensor = _patch_lang_tensor_np24
