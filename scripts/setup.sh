#!/usr/bin/env bash
# Set up attnssl on a fresh clone: .venv, torch, the package with its test tools, and (with
# --data) the Fashion-MNIST files. Safe to run again: each step is skipped once done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_PINS=${TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}
FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
want_data=0
[ "${1:-}" = "--data" ] && want_data=1

say() { printf 'setup: %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV" || {
    say "could not create a virtual environment; install python3-venv (Debian: apt-get install python3-venv) and run again"
    exit 1
  }
  "$VENV/bin/pip" install --quiet --upgrade pip
fi
PIP="$VENV/bin/pip"

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  say "installing $TORCH_PINS (the known-good pair on this platform)"
  # shellcheck disable=SC2086
  "$PIP" install --quiet $TORCH_PINS || {
    say "could not install $TORCH_PINS; installing the newest torch/torchvision pip can find instead"
    "$PIP" install --quiet "torch>=2.4" "torchvision>=0.19" || {
      say "no torch could be installed: see https://pytorch.org/get-started/locally/ for your platform, install it into $VENV, then run again"
      exit 1
    }
  }
fi

stamp="$VENV/.attnssl-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing attnssl (editable) with its test tools"
  "$PIP" install --quiet -e ".[dev]"
  touch "$stamp"
fi

if [ "$want_data" = 1 ]; then
  if [ -n "${DATA_ROOT:-}" ]; then
    ls "$DATA_ROOT"/train-images-idx3-ubyte* >/dev/null 2>&1 || {
      say "DATA_ROOT=$DATA_ROOT holds no train-images-idx3-ubyte[.gz]; put the four Fashion-MNIST IDX files there"
      exit 1
    }
  else
    have() { ls "$FASHION_MNIST_DIR"/train-images-idx3-ubyte* >/dev/null 2>&1; }
    if ! have && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "installing the Debian package dataset-fashion-mnist"
      { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } ||
        say "apt-get could not install dataset-fashion-mnist (see its messages above)"
    fi
    if ! have; then
      say "Fashion-MNIST is not in $FASHION_MNIST_DIR. Either run 'sudo apt-get install dataset-fashion-mnist'"
      say "(Debian/Ubuntu), or download the four IDX files (train/t10k images and labels) from"
      say "github.com/zalandoresearch/fashion-mnist into a folder and run: make demo DATA_ROOT=that/folder"
      exit 1
    fi
  fi
fi
say "ready"
