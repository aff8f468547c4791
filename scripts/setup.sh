#!/usr/bin/env bash
# Creates .venv with addertrain (editable) and the CPU development stack.
# Idempotent: a second run only checks that everything is installed (the import list includes
# the dev tools, so a venv made before one of them was declared gets it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import addertrain, deepspeed, ray, nvidia.dali, triton, sklearn, psutil, mlxtend, ruff, tensorboardX, xdist" 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints/cpu-dev.txt torch==2.13.0
    .venv/bin/python -m pip install -q -c constraints/cpu-dev.txt -e '.[cuda12,dev]'
fi
# The multi-node tests (run as root) make network namespaces with ip, from iproute2.
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2
fi
# The CPU adder op's C kernels (addertrain/ops/native.py), built once for this CPU so the first
# run does not pay for it; without a C compiler the op keeps its torch path.
.venv/bin/python -c "from addertrain.ops import native; native.library()"
