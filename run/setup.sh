#!/usr/bin/env bash
# Creates .venv with the pinned requirements and the project installed in editable mode.
# Idempotent: `make install` only calls this when requirements or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

have_mpi() { command -v mpirun >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q 'libmpi\.so'; }
if ! have_mpi; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Open MPI with apt (needed by mpi4py)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Open MPI with sudo apt (needed by mpi4py)"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "setup: warning: no MPI library and no way to install one; mpirun launching will be unavailable" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
# torch first and pinned, so no other package can pull a different (CUDA, several GB) build.
$PIP install -q "torch==2.13.0"
$PIP install -q -r requirements.txt -r requirements-dev.txt
$PIP install -q --no-deps -e .
echo "setup: .venv ready ($(.venv/bin/python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "deepspeed", v("deepspeed"))'))"
