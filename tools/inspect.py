"""``eep inspect``: members, the committed view and the view history, as tables or JSON.

Keys that hold malformed data are listed with what is wrong with each (and otherwise left
out, as the coordinator leaves them out); the exit status is then 2, as when etcd is away.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from eep.membership.commit import read_committed, read_history
from eep.membership.errors import MembershipError, check_type, decode_object
from eep.membership.etcd import EtcdClient, KeyValue
from eep.membership.keys import Keys
from eep.membership.registry import scan_slots

from .common import add_etcd_arguments, connect
from .coordinator import cluster_num_slots


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


def _leader(kv: KeyValue | None, problems: dict[str, str]) -> dict[str, Any] | None:
    """The election key's value, if it is the ``{identity, lease}`` a coordinator writes."""
    if kv is None:
        return None
    try:
        value = decode_object(kv.value, kv.key, MembershipError)
        check_type(value, "identity", str, kv.key, MembershipError)
    except KeyError:
        problems[kv.key] = f"{kv.key} lacks the field 'identity'"
        return None
    except MembershipError as exc:
        problems[kv.key] = str(exc)
        return None
    if kv.lease == 0:
        problems[kv.key] = f"{kv.key} is bound to no lease, so it would never expire"
    return value


def _read(client: EtcdClient, keys: Keys, history_n: int) -> dict[str, Any]:
    problems: dict[str, str] = {}
    scan = scan_slots(client, keys, cluster_num_slots(client, keys), quiet=True)
    problems.update(scan.malformed)
    state = read_committed(client, keys, problems=problems)
    history = read_history(client, keys, problems=problems)
    leader = _leader(client.get(keys.coordinator), problems)
    return {
        "revision": scan.revision,
        "records": scan.records,
        "view": state.view,
        "history": history[-history_n:] if history_n else [],
        "leader": leader,
        "problems": problems,
    }


def run(args: argparse.Namespace) -> int:
    client, keys = connect(args)
    try:
        got = _read(client, keys, args.history)
    except MembershipError as exc:
        print(f"eep inspect: {exc}")
        return 2
    records, view, history, problems = got["records"], got["view"], got["history"], got["problems"]
    status = 2 if problems else 0
    if args.json:
        out = {
            "cluster": keys.cluster,
            "revision": got["revision"],
            "coordinator": got["leader"],
            "slots": {s: json.loads(r.to_json()) for s, r in sorted(records.items())},
            "view": json.loads(view.to_json()) if view else None,
            "history": [json.loads(v.to_json()) for v in history],
            "malformed": dict(sorted(problems.items())),
        }
        print(json.dumps(out, indent=2, sort_keys=True))
        return status
    members = set(view.members) if view else set()
    leader = got["leader"]
    print(f"cluster {keys.cluster}  (etcd {args.etcd}, revision {got['revision']})")
    if leader is not None:
        print(f"coordinator: {leader['identity']}\n")
    else:
        unreadable = keys.coordinator in problems
        print(f"coordinator: {'unreadable (see below)' if unreadable else 'none elected'}\n")
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
    else:
        print(f"\nview epoch {view.epoch}: members {list(view.members)}  ({view.reason})")
    if view is not None and history:
        print()
        hist_rows = [[v.epoch, _when(v.committed_at), list(v.members), v.reason] for v in history]
        print(_table(["epoch", "committed", "members", "reason"], hist_rows))
    if problems:
        print(f"\nmalformed keys ({len(problems)}), ignored by the coordinator and the ranks:")
        for key, problem in sorted(problems.items()):
            print(f"  {problem}" if problem.startswith(key) else f"  {key}: {problem}")
    return status
