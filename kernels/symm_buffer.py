"""``SymmEpBuffer``: the ``symm`` fabric of one host, receive buffers in torch symmetric memory.

One symmetric allocation per rank, made once (sized by ``EpConfig``: ``max_tokens`` rows per
sender and local expert); peers' buffers are mapped into every rank's address space, and the
Triton kernels of ``EpFabric`` store straight into them. A dead peer's buffer stays mapped, so a
survivor's stores into it never fault; its waits on that peer end after ``exchange_timeout_s``
with the peer flagged in ``suspect_mask``.

Usage (every rank of ``group``, one GPU each)::

    buf = SymmEpBuffer(cfg, view, group)
    recv_x, handle = buf.dispatch(x, routing.topk_phy, routing.topk_weights)
    y = grouped_swiglu(recv_x.view(L * S, C, H), handle.recv_m.view(-1), w13, w2,
                       groups_per_expert=S)
    out = buf.combine(y, handle)
    # after the step: buf.status / buf.suspect_mask say whether it is valid and who is suspect
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from eep.kernels.config import EpConfig
from eep.kernels.fabric import EpFabric, FabricLayout
from eep.kernels.view import DeviceView


class SymmEpBuffer(EpFabric):
    """``EpFabric`` over torch symmetric memory. Collective: every rank of ``group`` (size
    ``cfg.num_slots``, rank = slot) constructs it together, once."""

    def __init__(
        self,
        cfg: EpConfig,
        view: DeviceView,
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        group = group or dist.group.WORLD
        if dist.get_world_size(group) != cfg.num_slots:
            raise ValueError(
                f"SymmEpBuffer: group has {dist.get_world_size(group)} ranks but the config has "
                f"{cfg.num_slots} slots; start one rank per slot."
            )
        device = device or torch.device("cuda", torch.cuda.current_device())
        try:
            symm_mem.set_backend("CUDA")  # plain CUDA IPC mappings: survive a dead peer
        except (RuntimeError, AttributeError):
            pass  # already chosen by an earlier allocation, or an older torch
        nbytes = FabricLayout.for_config(cfg).nbytes
        buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        buf.zero_()  # flags start at 0, which no (epoch, step >= 1) tag equals
        self._symm = symm_mem.rendezvous(buf, group.group_name)
        peer_base = torch.tensor(self._symm.buffer_ptrs, dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        # No peer may store into this buffer before it was zeroed.
        if dist.get_backend(group) == "nccl":
            dist.barrier(group=group, device_ids=[device.index])
        else:
            dist.barrier(group=group)
        super().__init__(cfg, dist.get_rank(group), view, buf, peer_base)
