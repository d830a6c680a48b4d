"""The cluster secret (eep.auth): its file, and the proof a rank's hello carries."""

from __future__ import annotations

import os
import stat

import pytest

from eep.auth import SecretError, create_secret, load_secret, new_nonce, proof, verify


@pytest.fixture
def secret_path(tmp_path) -> str:
    return str(tmp_path / "run" / "secret")


def test_create_secret_writes_a_0600_file_that_load_secret_reads_back(secret_path):
    value = create_secret(secret_path)
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    assert len(value) >= 32
    assert load_secret(secret_path) == value
    assert create_secret(secret_path + "2") != value  # random per cluster


def test_create_secret_is_exclusive(secret_path):
    first = create_secret(secret_path)
    with pytest.raises(FileExistsError):
        create_secret(secret_path)
    assert load_secret(secret_path) == first  # the first secret is left as it was


def test_create_secret_does_not_follow_a_planted_link(tmp_path, secret_path):
    target = tmp_path / "elsewhere"
    os.makedirs(os.path.dirname(secret_path))
    os.symlink(target, secret_path)
    with pytest.raises(FileExistsError):
        create_secret(secret_path)
    assert not target.exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_open_to_other_users_is_refused_with_the_fix(secret_path, mode):
    create_secret(secret_path)
    os.chmod(secret_path, mode)
    with pytest.raises(SecretError, match=rf"open to other users \(mode 0{mode:o}\); chmod 600"):
        load_secret(secret_path)


def test_a_missing_or_unnamed_or_short_secret_is_refused(tmp_path):
    with pytest.raises(SecretError, match="names no secret file"):
        load_secret("")
    with pytest.raises(SecretError, match="cannot read the cluster secret"):
        load_secret(str(tmp_path / "nowhere"))
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(SecretError, match="too short"):
        load_secret(str(short))


def test_a_secret_of_another_user_is_refused(secret_path):
    if os.getuid() != 0:
        pytest.skip("giving the file to another user needs root")
    create_secret(secret_path)
    os.chown(secret_path, 12345, -1)
    with pytest.raises(SecretError, match="belongs to uid 12345"):
        load_secret(secret_path)


def test_a_proof_verifies_for_its_nonce_and_identity_only():
    secret, nonce = "s" * 64, new_nonce()
    good = proof(secret, nonce, 3, 7)
    assert verify(secret, nonce, 3, 7, good)
    assert not verify(secret, new_nonce(), 3, 7, good)  # replayed on another challenge
    assert not verify(secret, nonce, 2, 7, good)  # another slot
    assert not verify(secret, nonce, 3, 8, good)  # another incarnation
    assert not verify("t" * 64, nonce, 3, 7, good)  # another cluster's secret
    assert not verify(secret, nonce, 3, 7, "")
    assert not verify(secret, nonce, 3, 7, good[:-1] + ("0" if good[-1] != "0" else "1"))
    assert not verify(secret, nonce, 3, 7, "é" * 64)  # not hex, not even ASCII: False, no error


def test_nonces_do_not_repeat():
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert all(len(n) == 32 for n in nonces)
