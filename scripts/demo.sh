#!/usr/bin/env bash
# Set up (if needed), build a random debug-flavor checkpoint and generate from it with the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python scripts/make_debug_checkpoint.py outputs/debug-random
exec .venv/bin/python -m qwen35.generate --model outputs/debug-random --prompt "The gated delta rule" \
    --max-new-tokens 24
