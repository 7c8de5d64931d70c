"""Checks (and debug-asset creation) that must happen before the Trainer is built, so that a missing or
unusable file fails with the config key that names it instead of after minutes of setup or mid-run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .debug_assets import TOKENIZER_FILE, ensure_stdlib_assets
from .toml_config import ConfigError


def prepare_files(sections: dict[str, Any], config_path: Path) -> None:
    model, data, checkpoint = sections["model"], sections["data"], sections["checkpoint"]
    architecture = model.architecture()
    assets, corpus = Path(model.hf_assets_path), Path(data.dataset_path)
    if data.bootstrap == "stdlib_docs":
        ensure_stdlib_assets(corpus, assets, architecture.vocab_size)

    tokenizer_file = assets / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise ConfigError(f"{config_path}: [model] hf_assets_path = {model.hf_assets_path!r}: no {TOKENIZER_FILE} "
                          f"there ({tokenizer_file.resolve()})")
    vocab = len(json.loads(tokenizer_file.read_text())["model"]["vocab"])
    if vocab > architecture.vocab_size:
        raise ConfigError(f"{config_path}: the tokenizer {tokenizer_file} has {vocab} tokens, more than the "
                          f"{model.flavor} model's vocab_size {architecture.vocab_size}")
    if not corpus.is_file():
        raise ConfigError(f"{config_path}: [data] dataset_path = {data.dataset_path!r}: file not found "
                          f"({corpus.resolve()})")
    if checkpoint.initial_load_path and not Path(checkpoint.initial_load_path).is_dir():
        raise ConfigError(f"{config_path}: [checkpoint] initial_load_path = {checkpoint.initial_load_path!r}: "
                          "directory not found")
