#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment in .venv with the pinned stack, and the
# built-in dataset (Fashion-MNIST from Debian's dataset-fashion-mnist) when it is missing.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.vit-ssl-installed"
want=$(cat constraints.txt pyproject.toml | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing the stack into $VENV (about 4 minutes the first time)"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch + torchvision first, pinned together (STACK.md: a later unpinned install can swap torch).
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ -z "${VIT_SSL_FASHION_MNIST:-}" ] && [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  echo "[setup] installing the built-in dataset (apt-get install dataset-fashion-mnist)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
echo "[setup] ready: $VENV"
