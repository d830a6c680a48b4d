"""Fabrics: the data plane that moves tokens between slots (dispatch/combine).

- ``shm``: CPU processes on one host, POSIX shared-memory mailboxes (this package);
- ``symm``: CUDA, the Triton kernels over torch symmetric memory (``eep.kernels``);
- ``nccl``: the fixed-membership baseline (``torch.distributed.all_to_all_single``).
"""

from .base import ExchangeFailed, FabricConfig, FailureReason

__all__ = ["ExchangeFailed", "FabricConfig", "FailureReason"]
