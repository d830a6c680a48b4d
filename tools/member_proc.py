"""A membership-only rank: holds a slot the way a serving rank does, without a model (the
member processes of the membership tests and of ``eep bench membership``).

``python -m eep.tools.member_proc --etcd H:P --cluster C --slot K`` opens a session, registers
``joining``, then ``ready``, and keeps a progress counter moving. With ``--write-every S`` it
also rewrites its record every S seconds (a fenced write), which is how tests show that a
process that lost its lease never writes as its old incarnation. It prints one JSON line per
event on stdout and exits 3 when fenced (lease lost), 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from eep.membership.errors import EtcdUnavailable, LeaseLost, MembershipError
from eep.membership.etcd import EtcdClient
from eep.membership.keys import Keys
from eep.membership.registry import SlotRegistration, SlotState
from eep.membership.session import Session, SessionConfig

EXIT_FENCED = 3


def _say(event: str, **fields) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--ttl", type=int, default=3)
    parser.add_argument("--write-every", type=float, default=0.0, metavar="S")
    parser.add_argument(
        "--wait-slot",
        type=float,
        default=30.0,
        metavar="S",
        help="wait this long for a predecessor's lease to go",
    )
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    steps = [0]
    client = EtcdClient(args.etcd)
    session = Session(
        client, SessionConfig(ttl_s=args.ttl), progress=lambda: steps[0], name=f"slot {args.slot}"
    ).open()
    reg = SlotRegistration(client, Keys(args.cluster), session, args.slot)
    try:
        record = reg.register(wait_s=args.wait_slot)
        _say("joining", slot=args.slot, incarnation=record.incarnation, lease=record.lease_id)
        reg.update(SlotState.READY)
        _say("ready", slot=args.slot, incarnation=record.incarnation)
        last_write = time.monotonic()
        while not stop.wait(0.05):
            steps[0] += 1
            session.check()
            if args.write_every and time.monotonic() - last_write >= args.write_every:
                try:
                    reg.update()
                except EtcdUnavailable:
                    continue  # etcd restarting: the session's deadline decides, not this write
                last_write = time.monotonic()
                _say("wrote", slot=args.slot, incarnation=record.incarnation)
    except LeaseLost as exc:
        _say("fenced", slot=args.slot, reason=str(exc))
        return EXIT_FENCED
    except MembershipError as exc:
        _say("error", slot=args.slot, reason=str(exc))
        return 2
    session.close()
    _say("stopped", slot=args.slot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
