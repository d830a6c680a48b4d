"""Fabrics: the data plane that moves tokens between slots (dispatch/combine).

- ``shm``: CPU processes on one host, POSIX shared-memory mailboxes (this package);
- ``symm``: CUDA, the Triton kernels over receive buffers shared by CUDA IPC (``eep.kernels``);
- ``nccl``: the fixed-membership baseline (``torch.distributed.all_to_all_single``).

Each implements :class:`Fabric`; ``make_fabric(kind, FabricConfig, FabricMember)``
(``factory``) builds one.
"""

from .base import ExchangeFailed, Fabric, FabricConfig, FabricMember, FailureReason

__all__ = ["ExchangeFailed", "Fabric", "FabricConfig", "FabricMember", "FailureReason"]
