"""Helpers (no tests) for in-process torchtitan runs of train_configs/debug.toml: rank 0 of 1, gloo on CPU."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qwen35 import Qwen35Config
from torchtitan_ext.debug_assets import ensure_stdlib_assets
from torchtitan.trainer import Trainer
from torchtitan_ext.train import load_config, run

REPO = Path(__file__).resolve().parent.parent
DEBUG_TOML = REPO / "train_configs" / "debug.toml"
# Generated once per checkout (not per test): the stdlib corpus and its tokenizer.
DEBUG_ASSETS = REPO / "outputs" / "debug_assets"


def debug_assets() -> Path:
    """The directory of the debug tokenizer (created with the corpus on first use)."""
    ensure_stdlib_assets(DEBUG_ASSETS / "stdlib_docs.jsonl", DEBUG_ASSETS, Qwen35Config.from_flavor("debug").vocab_size)
    return DEBUG_ASSETS


def debug_args(dump_folder: Path, *overrides: str) -> list[str]:
    return ["--config", str(DEBUG_TOML), "--job.dump_folder", str(dump_folder),
            "--model.hf_assets_path", str(DEBUG_ASSETS), "--data.dataset_path", str(DEBUG_ASSETS / "stdlib_docs.jsonl"),
            "--metrics.log_freq", "1", *overrides]


def train(dump_folder: Path, *overrides: str) -> None:
    run_instrumented(load_config(debug_args(dump_folder, *overrides)))


def run_instrumented(config, on_build: Callable[[Trainer], None] | None = None) -> None:
    """Run `config` end to end; `on_build(trainer)` runs right after torchtitan builds (and initialises) the
    Trainer, where a test can record state or wrap its step functions."""
    original_build = type(config).build

    def build(cfg):
        trainer = original_build(cfg)
        if on_build is not None:
            on_build(trainer)
        return trainer

    type(config).build = build
    try:
        run(config)
    finally:
        type(config).build = original_build
        gc.enable()  # torchtitan disables automatic GC for the training process


def scalars(dump_folder: Path, tb_folder: str = "tb") -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the TensorBoard event files of a run."""
    runs = sorted((dump_folder / tb_folder).iterdir())
    assert len(runs) == 1, runs
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
