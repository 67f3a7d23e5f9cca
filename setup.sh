#!/usr/bin/env bash
# Set up pfq-edge on a fresh Debian machine (idempotent; a second run with nothing changed takes about a second):
#   1. the Debian packages dataset-fashion-mnist (real Fashion-MNIST IDX files under /usr/share/datasets) and
#      gcc-aarch64-linux-gnu (links the TVM library of the cpu-aarch64 and gpu-cuda targets),
#   2. a virtual environment .venv with the pinned dependency set (constraints.txt; torch 2.13.0 CPU wheel),
#   3. finn-plus 1.6.1 and mip without their dependencies (finn-plus pins brevitas 0.13.0, broken on torch 2.13;
#      mip would pull a 600 MB solver the FINN estimate flow never calls),
#   4. pfq-edge itself, editable, with its test and efficientnet extras.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  echo "setup: installing Debian packages dataset-fashion-mnist gcc-aarch64-linux-gnu" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist gcc-aarch64-linux-gnu >/dev/null
fi

stamp=.venv/.pfq-edge-setup
want=$(cat constraints.txt pyproject.toml setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: creating .venv and installing the pinned dependency set (about 2 minutes)" >&2
python3 -m venv .venv
pip=(.venv/bin/pip --disable-pip-version-check -q)
"${pip[@]}" install -c constraints.txt -e ".[test,efficientnet]"
"${pip[@]}" install -c constraints.txt --no-deps finn-plus mip
echo "$want" > "$stamp"
echo "setup: done" >&2
