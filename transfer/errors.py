"""Typed errors of the transfer package.

Every error says what failed (the operation, the peer, the tensor) and what the user can do.
External failures are chained (``raise ... from exc``) so the engine's own message stays
visible. The executor catches :class:`SourceFailed` and its subclasses to re-plan; everything
else reaches the caller.
"""

from __future__ import annotations


class TransferError(Exception):
    """Base class of every error raised by ``eep.transfer``."""


class EngineError(TransferError):
    """The transfer engine could not be set up (initialise, register, unregister)."""


class SourceFailed(TransferError):
    """One peer failed one operation; the executor re-plans around it.

    ``op`` is the operation (``read``, ``write``, ``connect``...), ``peer`` the peer's session
    (``host:port``) and ``holder`` the manifest holder, when known.
    """

    def __init__(self, message: str, *, op: str, peer: str, holder: str = "") -> None:
        super().__init__(message)
        self.op, self.peer, self.holder = op, peer, holder


class TransferFailed(SourceFailed):
    """The engine returned a non-zero code for a read or write."""

    def __init__(self, op: str, peer: str, rc: int, detail: str = "", holder: str = "") -> None:
        super().__init__(
            f"transfer engine {op} from/to peer {peer}{f' ({holder})' if holder else ''} "
            f"failed with code {rc}{f': {detail}' if detail else ''}. The peer may have died or "
            "the address is not inside a region it registered; the executor re-plans around it, "
            "a direct caller should retry with another source.",
            op=op,
            peer=peer,
            holder=holder,
        )
        self.rc = rc


class PeerUnreachable(SourceFailed):
    """Nothing answered at the peer's transfer endpoint within the connect timeout."""


class SourceTimeout(SourceFailed):
    """A peer did not complete an operation within its deadline (hung, or far too slow)."""


class ChecksumMismatch(TransferError):
    """Bytes that arrived do not match the checksum their holder published."""

    def __init__(self, tensor: str, holder: str, expected: str, actual: str) -> None:
        super().__init__(
            f"tensor {tensor!r} from {holder} has checksum {actual}, but its manifest says "
            f"{expected}: the holder's copy is corrupt. The executor fetches it elsewhere; if "
            "every copy disagrees, check the holders' memory and re-publish their manifests."
        )
        self.tensor, self.holder, self.expected, self.actual = tensor, holder, expected, actual


class ManifestError(TransferError):
    """A manifest is missing, malformed, or does not fit what the caller expects."""


class UnknownSlot(ManifestError):
    """A slot number outside the cluster's ``[0, num_slots)``."""


class MissingManifest(ManifestError):
    """No manifest is published for a holder the caller named."""


class LayoutMismatch(ManifestError):
    """A holder describes a wanted tensor with another dtype, shape or size than the local
    layout: the two processes were built from different models or configs."""


class NoSource(TransferError):
    """Some wanted tensors have no live holder and no checkpoint copy."""

    def __init__(self, names: list[str], tried: str) -> None:
        shown = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
        super().__init__(
            f"{len(names)} tensor(s) have no source left ({shown}); tried: {tried}. Start a "
            "holder of them, or pass a checkpoint that contains them."
        )
        self.names = names


class CheckpointError(TransferError):
    """The safetensors checkpoint is missing, unreadable, or disagrees with the layout."""


class PullTimeout(TransferError):
    """A whole pull did not finish within its overall deadline."""
