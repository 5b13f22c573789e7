#!/usr/bin/env bash
# Run HERE (a machine with the package index), before the one GPU call: fills gpu_wheels/ (ignored by
# git; carried to the GPU machine) with a wheel of attnc and wheels of the pure-Python dependencies the
# GPU machine may lack. The GPU machine has no network: bench/gpu_run.sh installs from this folder.
#
#   bash bench/gpu_prepare.sh [PYTHON]     # PYTHON: the interpreter whose pip is used (default python3)
#
# markupsafe is the only compiled one: its wheels are fetched for CPython 3.10-3.13 on manylinux x86_64
# (a few kB each), so the folder fits whichever of those the GPU machine runs (it is said to be 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
DEST=gpu_wheels
rm -rf "$DEST"
mkdir -p "$DEST"

"$PY" -m pip wheel -q --no-deps . -w "$DEST"
# universal wheels (py3-none-any): the platform does not matter
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    "lark>=1.1" "jinja2>=3.1" "sympy>=1.13.3" "mpmath>=1.1,<1.4" "click>=8.1"
for v in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
        --python-version "$v" --implementation cp --platform manylinux2014_x86_64 "markupsafe>=2.0"
done
# Optional: flash-linear-attention's kernels for the linear section's baseline. They are in fla-core (the
# flash-linear-attention distribution itself holds only layers and models, and needs transformers).
# fla-core and its imports einops and packaging are pure-Python wheels; torch and triton are never
# fetched (--no-deps; gpu_run.sh installs with --no-deps too). Without them the section reads "n/a".
if "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" "fla-core>=0.5" einops packaging; then
    for wheel in "$DEST"/fla_core-*.whl "$DEST"/einops-*.whl "$DEST"/packaging-*.whl; do
        case "$wheel" in
            *-py3-none-any.whl) ;;
            *) echo "gpu_prepare: $wheel is not a pure-Python wheel: left out" >&2; rm -f "$wheel" ;;
        esac
    done
else
    echo "gpu_prepare: no fla-core wheel (the linear section's fla baseline will read n/a)" >&2
fi
rm -rf build  # setuptools' leftovers of the wheel build (ignored by git)

ls -l "$DEST"
for name in attnc lark jinja2 sympy mpmath click markupsafe; do
    ls "$DEST" | grep -qi "^${name}-" || { echo "gpu_prepare: no wheel for $name" >&2; exit 1; }
done
bytes=$(du -sb "$DEST" | cut -f1)
echo "gpu_prepare: $DEST is $((bytes / 1024)) KiB (the carry limit is 64 MiB)"
if [ "$bytes" -gt $((48 * 1024 * 1024)) ]; then
    echo "gpu_prepare: $DEST is too large to carry with room to spare" >&2
    exit 1
fi
