"""The cluster secret that rank links prove they know.

``eep launch`` (``eep.launcher``) makes a random secret per cluster in a file only its user can
read (0600, ``<workdir>/secret``) and names the file in the runtime config. A front-end
accepting a rank link sends a fresh nonce (``Challenge``); the rank answers with
``proof(secret, nonce, slot, incarnation)`` in its ``Hello``. Another local user cannot read the
file, so cannot take over a slot's link; a proof seen on the wire answers only its own nonce,
so replaying it on another link fails.

Why a file and not etcd: the etcd the launcher runs has no authentication, so anything in it is
readable by every process on the host; the file's mode draws the line at the user that runs
the cluster, which is the line that matters anyway (a process of that user can attach to the
workers themselves). Ranks on other hosts get the file the way they get the model.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat


class SecretError(RuntimeError):
    """The secret file is missing, unreadable, another user's, or open to other users."""


def create_secret(path: str) -> str:
    """Write a new random secret to ``path`` (mode 0600, created exclusively) and return it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    value = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def load_secret(path: str) -> str:
    """The secret in ``path``; a :class:`SecretError` naming the problem otherwise."""
    if not path:
        raise SecretError("the runtime config names no secret file; start with `eep launch`")
    try:
        with open(path) as f:
            st = os.fstat(f.fileno())  # the file read, not whatever the path names later
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"cannot read the cluster secret {path}: {exc}") from exc
    if st.st_uid != os.getuid():
        raise SecretError(
            f"the cluster secret {path} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.getuid()}); whoever owns it can read it"
        )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"the cluster secret {path} is open to other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    if len(value) < 32:
        raise SecretError(f"the cluster secret in {path} is too short")
    return value


def new_nonce() -> str:
    return secrets.token_hex(16)


def proof(secret: str, nonce: str, slot: int, incarnation: int) -> str:
    """What a rank sends in its hello: an HMAC of the nonce and its identity."""
    msg = f"{nonce}|{slot}|{incarnation}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def verify(secret: str, nonce: str, slot: int, incarnation: int, given: str) -> bool:
    """Whether ``given`` is the proof for this nonce and identity (in constant time)."""
    return hmac.compare_digest(proof(secret, nonce, slot, incarnation).encode(), given.encode())
