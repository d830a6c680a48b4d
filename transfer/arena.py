"""Arenas: a rank's tensors packed into one large registered region.

A rank keeps its expert weights in one arena and its KV blocks in another, so registering
memory and moving a whole slot's weights are a handful of large operations, and a tensor's
place in the arena (its offset) is all a peer needs to read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .engine import Region

ALIGN = 256  # bytes: keeps every tensor aligned for vector loads and DMA
_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    )
    if hasattr(torch, name)
}


def dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}.") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor's place in an arena: ``offset``/``nbytes`` in bytes, ``dtype`` by name."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def same_layout(self, other: TensorSpec) -> bool:
        """Same dtype, shape and size (the offset may differ between holders)."""
        return (self.dtype, tuple(self.shape), self.nbytes) == (
            other.dtype,
            tuple(other.shape),
            other.nbytes,
        )


@dataclass(frozen=True, slots=True)
class ArenaLayout:
    """Tensors packed back to back at ``ALIGN``-byte offsets; ``nbytes`` is the total."""

    specs: tuple[TensorSpec, ...]
    nbytes: int
    _index: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # by name in O(1): a pull of thousands of tensors looks every one up
        object.__setattr__(self, "_index", {s.name: s for s in self.specs})

    @classmethod
    def pack(cls, tensors: Iterable[tuple[str, str, Sequence[int]]]) -> ArenaLayout:
        """``[(name, dtype name, shape)]`` -> a layout in the order given."""
        specs, offset, seen = [], 0, set()
        for name, dtype, shape in tensors:
            if name in seen:
                raise ValueError(f"tensor name {name!r} appears twice in one arena layout.")
            seen.add(name)
            nbytes = dtype_of(dtype).itemsize
            for d in shape:
                nbytes *= int(d)
            specs.append(TensorSpec(name, dtype, tuple(int(d) for d in shape), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        return cls(tuple(specs), max(offset, ALIGN))

    def __getitem__(self, name: str) -> TensorSpec:
        return self._index[name]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]


class Arena:
    """One allocation holding a layout's tensors (or fixed-size KV blocks).

    ``device``: ``cpu`` or ``cuda:N``. Register once with a transport, publish :attr:`region`.
    """

    def __init__(
        self,
        name: str,
        layout: ArenaLayout,
        device: str | torch.device = "cpu",
        block_nbytes: int = 0,
    ) -> None:
        self.name, self.layout, self.block_nbytes = name, layout, block_nbytes
        self.device = torch.device(device)
        self.buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        self._transport = None
        self.ipc = ""

    @classmethod
    def for_kv(
        cls, name: str, num_blocks: int, block_nbytes: int, device: str | torch.device = "cpu"
    ) -> Arena:
        """An arena of ``num_blocks`` KV blocks of ``block_nbytes`` each."""
        if num_blocks < 1 or block_nbytes < 1 or block_nbytes % ALIGN:
            raise ValueError(
                f"a KV arena needs num_blocks >= 1 and block_nbytes a multiple of {ALIGN}; "
                f"got {num_blocks} x {block_nbytes}."
            )
        layout = ArenaLayout((), num_blocks * block_nbytes)
        return cls(name, layout, device, block_nbytes=block_nbytes)

    @property
    def addr(self) -> int:
        return self.buffer.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def num_blocks(self) -> int:
        return self.nbytes // self.block_nbytes if self.block_nbytes else 0

    @property
    def location(self) -> str:
        return f"cuda:{self.device.index or 0}" if self.device.type == "cuda" else "cpu:0"

    @property
    def region(self) -> Region:
        medium = "device" if self.device.type == "cuda" else "host"
        return Region(
            self.name, self.addr, self.nbytes, medium, str(self.device), self.ipc, self.block_nbytes
        )

    def bytes_of(self, spec: TensorSpec) -> torch.Tensor:
        """``[spec.nbytes]`` uint8 view of one tensor's bytes."""
        return self.buffer[spec.offset : spec.offset + spec.nbytes]

    def view(self, name: str) -> torch.Tensor:
        """The named tensor, typed and shaped, as a view into the arena."""
        spec = self.layout[name]
        return self.bytes_of(spec).view(dtype_of(spec.dtype)).view(spec.shape)

    def block(self, idx: int) -> torch.Tensor:
        """``[block_nbytes]`` uint8 view of KV block ``idx``."""
        if not 0 <= idx < self.num_blocks:
            raise IndexError(f"KV block {idx} outside [0, {self.num_blocks}) of {self.name}.")
        return self.buffer[idx * self.block_nbytes : (idx + 1) * self.block_nbytes]

    def register(self, transport) -> Region:
        """Register the whole arena with ``transport`` (once) and return its region."""
        if self._transport is None:
            self.ipc = transport.register(self.addr, self.nbytes, self.location) or ""
            self._transport = transport
        return self.region

    def unregister(self) -> None:
        if self._transport is not None:
            self._transport.unregister(self.addr)
            self._transport = None
