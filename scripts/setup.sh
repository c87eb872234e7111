#!/usr/bin/env bash
# Installs what the agent and its tests need on a fresh Debian machine, root or not:
# Debian packages (python3-venv, mosquitto; postgresql for the tests) when missing, then the pinned
# Python packages in .venv.
# Sourced by scripts/demo and scripts/test; safe to run again (it only installs what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

APT_UPDATED=0
apt_install() {
  # apt_install PKG...: install the Debian packages given, once `apt-get update` has run
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get not found; install $* by hand" >&2
    return 1
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    $SUDO apt-get update -qq || true
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$(command -v "$candidate")"; break; fi
  done
fi
if [ -z "$PYTHON" ]; then
  apt_install python3 python3-venv
  PYTHON="$(command -v python3)"
fi

need_pkgs=()
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then need_pkgs+=(python3-venv); fi
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  need_pkgs+=(mosquitto mosquitto-clients)
fi
if [ "${SETUP_WANT_SYSTEMD:-0}" = 1 ] && ! command -v systemd-analyze >/dev/null 2>&1; then
  need_pkgs+=(systemd)
fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "setup: installing ${need_pkgs[*]} from Debian" >&2
  apt_install "${need_pkgs[@]}" || echo "setup: could not install ${need_pkgs[*]}" >&2
fi

# The ingest's tests (tests/test_ingest_*.py) need a PostgreSQL on 127.0.0.1:5432 that lets the
# `postgres` user in without a password from loopback. Only for the test extra; cheap when one answers.
ensure_postgres() {
  if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then return 0; fi
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "setup: installing postgresql from Debian" >&2
    apt_install postgresql || { echo "setup: could not install postgresql" >&2; return 1; }
  fi
  local version cluster
  version="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
  cluster="$(pg_lsclusters -h 2>/dev/null | awk -v v="$version" '$1 == v {print $2; exit}')"
  if [ -z "$cluster" ]; then
    cluster=main
    $SUDO pg_createcluster "$version" "$cluster" >/dev/null
  fi
  # trust on loopback for the test user (a throwaway local cluster; never do this on a shared server)
  local hba="/etc/postgresql/$version/$cluster/pg_hba.conf"
  if [ -f "$hba" ] && ! $SUDO grep -q "store-agent tests" "$hba"; then
    $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust  # store-agent tests\nhost all postgres ::1/128 trust  # store-agent tests' "$hba"
  fi
  $SUDO pg_ctlcluster "$version" "$cluster" start 2>/dev/null || $SUDO pg_ctlcluster "$version" "$cluster" reload
  for _ in $(seq 1 50); do
    if pg_isready -q -h 127.0.0.1 -p 5432; then return 0; fi
    sleep 0.2
  done
  echo "setup: PostgreSQL does not answer on 127.0.0.1:5432" >&2
  return 1
}
if [ "${SETUP_EXTRAS:-run}" = test ]; then
  ensure_postgres || true
fi

VENV="$ROOT/.venv"
STAMP="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${SETUP_EXTRAS:-run}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "setup: installing Python packages into .venv" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  if [ "${SETUP_EXTRAS:-run}" = test ]; then
    "$VENV/bin/python" -m pip install -q -e ".[test]"
  else
    "$VENV/bin/python" -m pip install -q -e .
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
