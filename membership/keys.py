"""The etcd key schema, in one place (README.md shows it with `etcdctl` examples).

| key                                   | writer                 | value                      |
|---------------------------------------|------------------------|----------------------------|
| /eep/<cluster>/config                 | launcher, once         | model and runtime config   |
| /eep/<cluster>/slots/<slot>           | rank, lease-bound      | SlotRecord                 |
| /eep/<cluster>/incarnations/<slot>    | rank, CAS              | last incarnation number    |
| /eep/<cluster>/view                   | coordinator, CAS txn   | View                       |
| /eep/<cluster>/views/<epoch:08d>      | same txn               | View (history)             |
| /eep/<cluster>/coordinator            | coordinator, leased    | leader's identity          |
| /eep/<cluster>/manifests/<slot>       | rank                   | weight arena layout        |
| /eep/<cluster>/fabric/<slot>          | rank (symm), leased    | IPC handle of its buffer   |
| /eep/<cluster>/frontend               | front-end, leased      | address                    |
"""

from __future__ import annotations

import re

from .errors import INT64_MAX, MalformedRecord

ROOT = "/eep"
_CLUSTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class Keys:
    """Key names of one cluster."""

    def __init__(self, cluster: str):
        if not _CLUSTER_RE.match(cluster):
            raise ValueError(
                f"cluster name {cluster!r} must be 1-63 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit."
            )
        self.cluster = cluster
        self.prefix = f"{ROOT}/{cluster}/"

    @property
    def config(self) -> str:
        return self.prefix + "config"

    @property
    def slots(self) -> str:
        return self.prefix + "slots/"

    def slot(self, slot: int) -> str:
        return f"{self.slots}{slot}"

    def incarnation(self, slot: int) -> str:
        return f"{self.prefix}incarnations/{slot}"

    @property
    def view(self) -> str:
        return self.prefix + "view"

    @property
    def views(self) -> str:
        return self.prefix + "views/"

    def view_at(self, epoch: int) -> str:
        return f"{self.views}{epoch:08d}"

    @property
    def coordinator(self) -> str:
        return self.prefix + "coordinator"

    @property
    def manifests(self) -> str:
        return self.prefix + "manifests/"

    def manifest(self, slot: int) -> str:
        return f"{self.manifests}{slot}"

    def fabric(self, slot: int) -> str:
        """The ``symm`` fabric buffer a slot's incarnation exported (lease-bound)."""
        return f"{self.prefix}fabric/{slot}"

    @property
    def frontend(self) -> str:
        return self.prefix + "frontend"

    def slot_of(self, key: str) -> int:
        """The slot number of a ``slots/<slot>`` key, written as :meth:`slot` writes it (no sign,
        no leading zero, ASCII digits): ``slots/01`` or ``slots/x`` is a
        :class:`MalformedRecord`, not slot 1."""
        return self._number(key, self.slots, str)

    def epoch_of(self, key: str) -> int:
        """The epoch of a ``views/<epoch:08d>`` key, written as :meth:`view_at` writes it."""
        return self._number(key, self.views, lambda n: f"{n:08d}")

    @staticmethod
    def _number(key: str, prefix: str, spell) -> int:
        text = key[len(prefix) :] if key.startswith(prefix) else ""
        if text.isascii() and text.isdigit() and len(text) <= 19:
            number = int(text)
            if number <= INT64_MAX and spell(number) == text:
                return number
        raise MalformedRecord(f"{key} is not a key of the form {prefix}<number>")


def parse_counter(raw: bytes, where: str) -> int:
    """An ``incarnations/<slot>`` counter: ASCII decimal in ``[0, 2**63 - 2]`` (so that one
    more still fits the status block's 64-bit word)."""
    text = raw.decode("ascii", errors="replace").strip()
    if text.isascii() and text.isdigit() and len(text) <= 19:
        number = int(text)
        if number < INT64_MAX:
            return number
    raise MalformedRecord(f"{where} must hold an incarnation counter, got {raw[:40]!r}")
