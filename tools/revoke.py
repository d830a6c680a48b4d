"""``eep revoke``: end a slot's registration now by revoking its lease."""

from __future__ import annotations

import argparse

from eep.membership.errors import MembershipError
from eep.membership.registry import revoke_slot

from .common import add_etcd_arguments, connect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_etcd_arguments(parser)
    parser.add_argument("--slot", type=int, required=True, help="the slot to revoke")
    parser.add_argument(
        "--incarnation", type=int, default=None, help="only if this incarnation holds the slot"
    )


def run(args: argparse.Namespace) -> int:
    client, keys = connect(args)
    try:
        revoked = revoke_slot(client, keys, args.slot, args.incarnation)
    except MembershipError as exc:
        print(f"eep revoke: {exc}")
        return 2
    print(f"slot {args.slot}: {'lease revoked' if revoked else 'no matching registration'}")
    return 0 if revoked else 1
