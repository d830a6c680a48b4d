"""The last fallback: tensors read from the checkpoint on disk (safetensors).

``path`` is one ``.safetensors`` file or a directory of them; the index of which file holds
which tensor is read from the files' headers once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .arena import Arena, TensorSpec, dtype_name, dtype_of
from .errors import CheckpointError


class Checkpoint:
    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        root = Path(path)
        files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
        if not files or not all(f.is_file() for f in files):
            raise CheckpointError(
                f"no safetensors checkpoint at {str(path)!r}: give a .safetensors file or a "
                "directory holding them."
            )
        self.files: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        self.files.setdefault(name, f)
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"cannot read checkpoint file {f}: {exc}") from exc

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def load_into(self, arena: Arena, spec: TensorSpec) -> None:
        """Copy tensor ``spec.name`` from disk into its place in ``arena``."""
        path = self.files.get(spec.name)
        if path is None:
            raise CheckpointError(f"tensor {spec.name!r} is not in the checkpoint.")
        try:
            with self._safe_open(str(path), framework="pt") as h:
                t = h.get_tensor(spec.name)
        except Exception as exc:
            raise CheckpointError(f"cannot read {spec.name!r} from {path}: {exc}") from exc
        if tuple(t.shape) != tuple(spec.shape):
            raise CheckpointError(
                f"checkpoint {path} has {spec.name!r} as {dtype_name(t.dtype)}{list(t.shape)}, "
                f"the local layout wants {spec.dtype}{list(spec.shape)}: wrong checkpoint for "
                "this model?"
            )
        # a checkpoint stored in another precision (bf16 on disk, served in fp32) converts
        t = t.to(dtype_of(spec.dtype))
        dst = arena.bytes_of(spec)
        dst.copy_(t.contiguous().reshape(-1).view(torch.uint8), non_blocking=False)


def save_checkpoint(arena: Arena, path: str | os.PathLike) -> None:
    """Write every tensor of ``arena``'s layout to one safetensors file (tests, benches)."""
    from safetensors.torch import save_file

    save_file(
        {s.name: arena.view(s.name).cpu().contiguous() for s in arena.layout.specs}, str(path)
    )
