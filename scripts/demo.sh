#!/usr/bin/env bash
# End to end on CPU in a few minutes: set up .venv, train train_configs/debug.toml (300 steps, checkpointing on, so
# the last step is saved), export the last checkpoint to an HF directory, and generate from the export with the CLI.
# Idempotent: every run starts from scratch in outputs/demo (the corpus and tokenizer in outputs/debug_assets are
# generated once and reused).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

RUN=outputs/demo
STEPS=300  # = [training] steps of train_configs/debug.toml
rm -rf "$RUN"
.venv/bin/python -m torchtitan_ext.train --config train_configs/debug.toml \
    --job.dump_folder "$RUN" --checkpoint.enable true
.venv/bin/python -m torchtitan_ext.export_hf --config train_configs/debug.toml \
    --checkpoint "$RUN/checkpoint/step-$STEPS" --output "$RUN/hf"
exec .venv/bin/python -m qwen35.generate --model "$RUN/hf" --prompt "Return a new" --max-new-tokens 32
