"""``eep inspect``: members, the committed view and the view history, as tables or JSON."""

from __future__ import annotations

import argparse
import json
import time

from eep.membership.commit import read_history, read_view
from eep.membership.errors import MembershipError
from eep.membership.registry import read_slots

from .common import add_etcd_arguments, connect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_etcd_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--history", type=int, default=10, metavar="N", help="show the last N views (default 10)"
    )


def _table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _when(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def run(args: argparse.Namespace) -> int:
    client, keys = connect(args)
    try:
        records, revision = read_slots(client, keys)
        view, _ = read_view(client, keys)
        history = read_history(client, keys)[-args.history :] if args.history else []
        leader = client.get(keys.coordinator)
    except MembershipError as exc:
        print(f"eep inspect: {exc}")
        return 2
    if args.json:
        out = {
            "cluster": keys.cluster,
            "revision": revision,
            "coordinator": leader.json() if leader else None,
            "slots": {s: json.loads(r.to_json()) for s, r in sorted(records.items())},
            "view": json.loads(view.to_json()) if view else None,
            "history": [json.loads(v.to_json()) for v in history],
        }
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    members = set(view.members) if view else set()
    print(f"cluster {keys.cluster}  (etcd {args.etcd}, revision {revision})")
    print(f"coordinator: {leader.json().get('identity') if leader else 'none elected'}\n")
    rows = [
        [
            s,
            r.incarnation,
            r.state.value,
            "yes" if s in members else "no",
            r.pid,
            r.host,
            r.device,
            f"{r.lease_id:x}",
        ]
        for s, r in sorted(records.items())
    ]
    headers = ["slot", "inc", "state", "in view", "pid", "host", "device", "lease"]
    print(_table(headers, rows) if rows else "no slots registered")
    if view is None:
        print("\nno view committed yet")
        return 0
    print(f"\nview epoch {view.epoch}: members {list(view.members)}  ({view.reason})")
    if history:
        print()
        hist_rows = [[v.epoch, _when(v.committed_at), list(v.members), v.reason] for v in history]
        print(_table(["epoch", "committed", "members", "reason"], hist_rows))
    return 0
