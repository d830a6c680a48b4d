#!/usr/bin/env bash
# Sets up a fresh CPU machine of this project's kind: Debian packages, a virtual environment
# with the pinned packages, and an editable install of eep. Running it again redoes nothing
# that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
# the multi-host harness (eep.tools.netns); these live in /usr/sbin, off a plain user's PATH
sbin="$PATH:/usr/sbin:/sbin"
PATH="$sbin" command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
PATH="$sbin" command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
ldconfig -p 2>/dev/null | grep -q 'libibverbs.so.1' || need_apt+=(libibverbs1)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
stamp=.venv/.eep-setup
if [ -f "$stamp" ] && [ "$stamp" -nt requirements/cpu.txt ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
echo "setup: installing pinned Python packages into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements/cpu.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
touch "$stamp"
echo "setup: done"
