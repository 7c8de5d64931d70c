"""Checks (and debug-asset creation) that must happen before the Trainer is built, so that a missing or
unusable file fails with the config key that names it instead of after minutes of setup or mid-run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen35.tokenizer import Qwen35Tokenizer

from .data import DataError
from .debug_assets import ensure_stdlib_assets
from .toml_config import ConfigError


def prepare_files(sections: dict[str, Any], config_path: Path) -> None:
    model, data, checkpoint = sections["model"], sections["data"], sections["checkpoint"]
    architecture = model.architecture()
    if data.bootstrap == "stdlib_docs":
        if not data.dataset_path:
            raise ConfigError(f"{config_path}: [data] bootstrap = \"stdlib_docs\" writes the corpus to "
                              "[data] dataset_path, which is not set")
        ensure_stdlib_assets(Path(data.dataset_path), Path(model.hf_assets_path), architecture.vocab_size)

    try:
        tokenizer = Qwen35Tokenizer.from_dir(model.hf_assets_path)
        tokenizer.check_fits(architecture.vocab_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{config_path}: [model] hf_assets_path = {model.hf_assets_path!r}: {err}") from None
    if data.kind == "sft" and tokenizer.chat_template is None:
        raise ConfigError(f"{config_path}: [data] kind = \"sft\" needs a chat template: no chat_template.jinja "
                          f"(or tokenizer_config.json 'chat_template') in [model] hf_assets_path = "
                          f"{model.hf_assets_path!r}")
    named_specs = [("[data] dataset_path" if data.dataset_path else f"[data] sources[{i}] path", spec)
                   for i, spec in enumerate(data.source_specs(config_path))]
    if sections["validator"].enable:
        named_specs.append(("[validator] dataset_path", sections["validator"].source(data)))
    for key, spec in named_specs:
        try:
            if not spec.exists():
                raise DataError("not found")
            spec.resolved_format()
        except DataError as err:
            raise ConfigError(f"{config_path}: {key} = {spec.path!r}: {err} ({Path(spec.path).absolute()})") from None
    if checkpoint.initial_load_path and not Path(checkpoint.initial_load_path).is_dir():
        raise ConfigError(f"{config_path}: [checkpoint] initial_load_path = {checkpoint.initial_load_path!r}: "
                          "directory not found")
