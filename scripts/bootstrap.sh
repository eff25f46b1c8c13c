#!/usr/bin/env bash
# Installs what storage-sidecar needs on a fresh Debian machine, and nothing that is already there.
# Usage: scripts/bootstrap.sh [--bench]   (--bench adds rclone and fio, the benchmark peer and load generator)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

apt_pkgs=(fuse3 libfuse3-dev pkg-config gcc rsync rclone)  # rsync, rclone: the small-file tests use them
[[ "${1:-}" == "--bench" ]] && apt_pkgs+=(fio)

missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Azurite (the Azure Blob emulator the tests start) from npm, pinned: 3.36+ needs Node >= 21.
azurite=.tools/azurite/node_modules/.bin/azurite-blob
if [[ ! -x "$azurite" ]]; then
    if ! command -v npm >/dev/null; then
        echo "bootstrap: installing Debian packages: nodejs npm"
        if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
    fi
    echo "bootstrap: installing azurite@3.35.0 into .tools/azurite"
    npm install --silent --no-audit --no-fund --prefix .tools/azurite azurite@3.35.0 >/dev/null
fi

extras=test
[[ "${1:-}" == "--bench" ]] && extras=test,bench
stamp="$VENV/.installed-$extras"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || setup.py -nt "$stamp" || sidecar/_fusept.c -nt "$stamp" ]]; then
    echo "bootstrap: preparing the virtualenv $VENV ($extras)"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    "$VENV/bin/python" -m pip check
    touch "$stamp"
fi
