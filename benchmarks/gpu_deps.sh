#!/usr/bin/env bash
# Fill gpu-deps/ (git-ignored) with what a GPU node's image lacks for `make gpu-check`: DeepSpeed and its
# pure-Python dependencies copied from this checkout's .venv, plus pydantic-core, the one compiled
# dependency, as the CPython 3.12 manylinux wheel (a GPU image's python3 may be another version than the
# venv's). The GPU node then needs no network: benchmarks/gpu_check.sh puts gpu-deps/ on PYTHONPATH.
#
#   benchmarks/gpu_deps.sh [DEST]      # DEST defaults to gpu-deps/ in the repository root
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/gpu-deps}"
PY="${GLM_VENV_PYTHON:-$ROOT/.venv/bin/python}"
TARGET_PYTHON="${GPU_PYTHON_VERSION:-3.12}"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Pure-Python packages (import name and distribution name), each with its .dist-info so that
# importlib.metadata finds their versions.
PACKAGES=(deepspeed hjson pydantic annotated_types typing_inspection)
DISTS=(deepspeed hjson pydantic annotated_types typing_inspection)

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
for i in "${!PACKAGES[@]}"; do
  cp -r "$SITE/${PACKAGES[$i]}" "$DEST.tmp/"
  cp -r "$SITE/${DISTS[$i]}"-*.dist-info "$DEST.tmp/"
done
# pydantic needs a newer typing_extensions than some images hold; it is one file.
cp "$SITE/typing_extensions.py" "$DEST.tmp/"
find "$DEST.tmp" -name __pycache__ -prune -exec rm -rf {} +

CORE_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("pydantic-core"))')"
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "pydantic-core==$CORE_VERSION" -d "$WHEELS"
"$PY" -m zipfile -e "$WHEELS"/pydantic_core-*.whl "$DEST.tmp/"

rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "$DEST: deepspeed $("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))"), pydantic-core $CORE_VERSION" \
  "(cp${TARGET_PYTHON/./}), $(du -sh "$DEST" | cut -f1)"
