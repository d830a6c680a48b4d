"""Triton EP kernels (torch and triton only): routing against the committed view,
dispatch/combine within one host over symmetric memory, and the grouped SwiGLU expert GEMM;
and, for the transfer service, the batched checksum of many byte ranges (``checksum.py``).

``reference.py`` holds a pure-torch reference of each kernel. Submodules import lazily from
here so that ``eep.kernels.reference`` alone needs no Triton compiler.
"""

from eep.kernels.config import EpConfig
from eep.kernels.view import DeviceView

__all__ = ["EpConfig", "DeviceView"]
