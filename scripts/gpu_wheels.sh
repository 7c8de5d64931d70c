#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels the GPU machine lacks into .wheels/ (git-ignored), for
# Python 3.12 / x86_64 (the device image: torch 2.11 + triton 3.6, transformers 5.17, no registry). Carry .wheels
# with the device tool and install there with `python3 -m pip install --no-deps --no-index .wheels/*.whl`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .wheels
.venv/bin/pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any -d .wheels \
    flash-linear-attention==0.6.0 fla-core==0.6.0 transformers==5.23.0 torchtitan==0.3.0 torchao==0.18.0 torchdata==0.11.0 spmd_types==0.3.1 \
    torch_checkpointing tyro docstring-parser typeguard "datasets<4.8" dill multiprocess
du -sh .wheels
