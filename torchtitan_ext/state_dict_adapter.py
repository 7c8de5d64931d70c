"""HF checkpoint <-> torchtitan state dict. Our keys are HF's text-model keys, so the mapping is a rename at
most: multimodal checkpoints (every published Qwen3.5) keep the decoder under `model.language_model.`, and a
tied lm_head is not stored in HF checkpoints."""

from __future__ import annotations

from typing import Any

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

TEXT_PREFIX = "model."
MULTIMODAL_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


class Qwen35StateDictAdapter(StateDictAdapter):
    def __init__(self, model_config, hf_assets_path: str | None):
        # Reads <hf_assets_path>/model.safetensors.index.json into fqn_to_index_mapping when there is one.
        super().__init__(model_config, hf_assets_path)
        self.tied = model_config.architecture.tie_word_embeddings
        hf_keys = self.fqn_to_index_mapping or {}
        self.decoder_prefix = MULTIMODAL_PREFIX if any(k.startswith(MULTIMODAL_PREFIX) for k in hf_keys) \
            else TEXT_PREFIX

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
