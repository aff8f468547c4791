#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what the lent GPU machine lacks: it runs Python 3.12 on
# x86-64 with torch, triton, numpy, pyyaml and pytest, has no network, and lacks deepspeed
# and the pydantic stack. scripts/gpu_check.sh installs these wheels there.
#   - deepspeed: built here from its sdist as a py3-none-any wheel (DS_BUILD_OPS=0: its
#     C++/CUDA ops JIT-compile when first used, none are prebuilt)
#   - pydantic, pydantic-core (cp312 manylinux), annotated-types, typing-inspection,
#     typing-extensions, hjson: downloaded for cp312 / manylinux x86_64
# Versions follow this checkout's .venv, so both machines run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV_PY:-.venv/bin/python}
DEST=.whl

version() {
    local v
    v=$("$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')
    if [ -z "$v" ]; then
        echo "fetch_gpu_wheels: $1 is not installed in $PY's environment; run scripts/setup.sh first" >&2
        exit 2
    fi
    echo "$v"
}

specs=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson safetensors; do
    specs+=("$name==$(version "$name")")
done
deepspeed=$(version deepspeed)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "${specs[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$work" "deepspeed==$deepspeed"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$work"/deepspeed-*.tar.gz

ls "$DEST"
du -sh "$DEST"
