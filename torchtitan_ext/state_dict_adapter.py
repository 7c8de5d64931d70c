"""HF checkpoint <-> torchtitan state dict. Our keys are HF's text-model keys, so the mapping is a rename at
most: multimodal checkpoints (every published Qwen3.5) keep the decoder under `model.language_model.`, and a
tied lm_head is not stored in HF checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.hf_io import text_tensor_names

from .checkpoint import CheckpointError

TEXT_PREFIX = "model."
MULTIMODAL_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"
# Qwen35Config fields that do not change the weights or the text-only forward: a training run may differ here.
_NOT_ARCHITECTURE = {"router_aux_loss_coef", "initializer_range", "max_position_embeddings", "mrope_section",
                     "pad_token_id", "bos_token_id", "eos_token_id"}


class HFCheckpointMismatch(CheckpointError):
    pass


def check_hf_directory(hf_dir: Path, architecture: Qwen35Config) -> None:
    """Before initial weights are read from `hf_dir`: its config.json describes `architecture` (the TOML flavor
    after [model] overrides) and its safetensors hold exactly that model's tensors (vision and MTP tensors
    excepted, as in qwen35.load_pretrained). torchtitan reads only the tensors it asks for, so without this a
    different architecture or an extra tensor went unnoticed."""
    theirs = Qwen35Config.from_hf_file(hf_dir / "config.json")
    for field in dataclasses.fields(Qwen35Config):
        if field.name not in _NOT_ARCHITECTURE and getattr(theirs, field.name) != getattr(architecture, field.name):
            raise HFCheckpointMismatch(
                f"{hf_dir / 'config.json'}: {field.name} = {getattr(theirs, field.name)!r}, but the training config "
                f"([model] flavor and overrides) has {field.name} = {getattr(architecture, field.name)!r}; the HF "
                "weights belong to another architecture (choose the matching flavor)")
    with torch.device("meta"):
        expected = set(Qwen35ForCausalLM(architecture).state_dict())
    stored = text_tensor_names(hf_dir)
    if architecture.tie_word_embeddings:
        expected.discard(LM_HEAD)
        stored.discard(LM_HEAD)  # a tied checkpoint may store the shared tensor twice
    for kind, names in (("unexpected", stored - expected), ("missing", expected - stored)):
        if names:
            raise HFCheckpointMismatch(f"{hf_dir}: the checkpoint has {len(names)} {kind} tensor(s) for the "
                                       f"training config's architecture, first {min(names)!r}; all: {sorted(names)}")


class Qwen35StateDictAdapter(StateDictAdapter):
    def __init__(self, model_config, hf_assets_path: str | None):
        # Reads <hf_assets_path>/model.safetensors.index.json into fqn_to_index_mapping when there is one.
        super().__init__(model_config, hf_assets_path)
        self.tied = model_config.architecture.tie_word_embeddings
        hf_keys = self.fqn_to_index_mapping or {}
        self.decoder_prefix = MULTIMODAL_PREFIX if any(k.startswith(MULTIMODAL_PREFIX) for k in hf_keys) \
            else TEXT_PREFIX

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False):
        """torchtitan's reader for initial weights from an HF directory, once check_hf_directory passes."""
        check_hf_directory(Path(path), self.model_config.architecture)
        return super().get_hf_storage_reader(path, from_quantized)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf = {}
        for key, value in state_dict.items():
            if key == LM_HEAD and self.tied:
                continue
            hf[self.decoder_prefix + key[len(TEXT_PREFIX):] if key.startswith(TEXT_PREFIX) else key] = value
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        state = {}
        for key, value in hf_state_dict.items():
            state[TEXT_PREFIX + key[len(self.decoder_prefix):] if key.startswith(self.decoder_prefix) else key] = value
        if self.tied:
            state[LM_HEAD] = state[EMBEDDING]
        return state
