#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Idempotent; needs only Python 3.11 + pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# CPU machines: torch 2.13.0 is the CPU wheel this project is verified with; install it first so nothing
# below pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
