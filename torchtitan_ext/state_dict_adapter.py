"""HF checkpoint <-> torchtitan state dict. Our keys are HF's text-model keys, so the mapping is a rename at
most: multimodal checkpoints (every published Qwen3.5) keep the decoder under `model.language_model.`, and a
tied lm_head is not stored in HF checkpoints. MoE experts stored per expert (`experts.{e}.{gate,up,down}_proj
.weight`, as transformers' save_pretrained writes them and as the published MTP layer ships) are split for
reading and stacked into our fused tensors.

The layout is read from `[model] hf_assets_path`: its safetensors index, or the header of its single
model.safetensors (transformers saves small models unsharded)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor, distribute_tensor
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.hf_io import MTP_PREFIX, text_tensor_names

from .checkpoint import CheckpointError

TEXT_PREFIX = "model."
MULTIMODAL_PREFIX = "model.language_model."
LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"
# Qwen35Config fields that do not change the weights or the text-only forward: a training run may differ here.
# The MTP head is the training run's choice ([model] mtp_loss_weight): published checkpoints ship one either way.
_NOT_ARCHITECTURE = {"router_aux_loss_coef", "initializer_range", "max_position_embeddings", "mrope_section",
                     "pad_token_id", "bos_token_id", "eos_token_id", "mtp_num_hidden_layers", "mtp_loss_weight"}


class HFCheckpointMismatch(CheckpointError):
    pass


def check_hf_directory(hf_dir: Path, architecture: Qwen35Config) -> None:
    """Before initial weights are read from `hf_dir`: its config.json describes `architecture` (the TOML flavor
    after [model] overrides) and its safetensors hold exactly that model's tensors (vision tensors excepted, and
    MTP tensors when the model has no MTP head, as in qwen35.load_pretrained). torchtitan reads only the tensors it asks for, so without this a
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
    if not architecture.mtp_num_hidden_layers:
        stored = {name for name in stored if not name.startswith(MTP_PREFIX)}
    if architecture.tie_word_embeddings:
        expected.discard(LM_HEAD)
        stored.discard(LM_HEAD)  # a tied checkpoint may store the shared tensor twice
    for kind, names in (("unexpected", stored - expected), ("missing", expected - stored)):
        if names:
            raise HFCheckpointMismatch(f"{hf_dir}: the checkpoint has {len(names)} {kind} tensor(s) for the "
                                       f"training config's architecture, first {min(names)!r}; all: {sorted(names)}")


_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.\d+\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def hf_checkpoint_keys(hf_assets_path: str | None, index_keys: dict[str, Any] | None) -> set[str]:
    """The tensor names of the HF checkpoint at hf_assets_path (empty when there is none)."""
    if index_keys:
        return set(index_keys)
    single = Path(hf_assets_path) / "model.safetensors" if hf_assets_path else None
    if single is None or not single.is_file():
        return set()
    with safe_open(single, framework="pt", device="cpu") as f:
        return set(f.keys())


def split_experts_for_reading(hf: dict[str, Any], per_expert_bases: set[str]) -> dict[str, Any]:
    """Replace the fused expert tensors of the bases stored per expert by empty per-expert tensors to read into
    (full tensors, also for a sharded DTensor: the per-expert keys cut across its shards)."""
    out = {}
    for key, value in hf.items():
        match = _FUSED.match(key)
        if match is None or match.group(1) not in per_expert_bases:
            out[key] = value
            continue
        base, kind = match.groups()
        full_shape = value.shape  # [E, 2I, H] or [E, H, I]
        options = dict(dtype=value.dtype, device=value.to_local().device if isinstance(value, DTensor)
                       else value.device)
        for e in range(full_shape[0]):
            if kind == "gate_up_proj":
                inter = full_shape[1] // 2
                out[f"{base}.{e}.gate_proj.weight"] = torch.empty(inter, full_shape[2], **options)
                out[f"{base}.{e}.up_proj.weight"] = torch.empty(inter, full_shape[2], **options)
            else:
                out[f"{base}.{e}.down_proj.weight"] = torch.empty(full_shape[1], full_shape[2], **options)
    return out


def fuse_experts_after_reading(hf: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """Stack per-expert tensors into the fused keys of `like` (same placement as its tensors)."""
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for key, value in hf.items():
        if _PER_EXPERT.match(key):
            base, rest = key.rsplit(".mlp.experts.", 1)
            expert, proj = rest.split(".")[:2]
            groups.setdefault(f"{base}.mlp.experts", {})[(int(expert), proj)] = value
        else:
            out[key] = value
    for base, parts in groups.items():
        experts = range(1 + max(e for e, _ in parts))
        fused = {f"{base}.gate_up_proj": torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]])
                                                      for e in experts]),
                 f"{base}.down_proj": torch.stack([parts[(e, "down_proj")] for e in experts])}
        for key, value in fused.items():
            target = like[key]
            out[key] = (distribute_tensor(value, target.device_mesh, target.placements)
                        if isinstance(target, DTensor) else value)
    return out


class Qwen35StateDictAdapter(StateDictAdapter):
    def __init__(self, model_config, hf_assets_path: str | None):
        # Reads <hf_assets_path>/model.safetensors.index.json into fqn_to_index_mapping when there is one.
        super().__init__(model_config, hf_assets_path)
        self.tied = model_config.architecture.tie_word_embeddings
        hf_keys = hf_checkpoint_keys(hf_assets_path, self.fqn_to_index_mapping)
        self.decoder_prefix = MULTIMODAL_PREFIX if any(k.startswith(MULTIMODAL_PREFIX) for k in hf_keys) \
            else TEXT_PREFIX
        self.per_expert_bases = {m.group(1) for m in map(_PER_EXPERT.match, hf_keys) if m}
        self._fused_targets: dict[str, Any] = {}

    def _hf_key(self, key: str) -> str:
        return self.decoder_prefix + key[len(TEXT_PREFIX):] if key.startswith(TEXT_PREFIX) else key

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False):
        """torchtitan's reader for initial weights from an HF directory, once check_hf_directory passes."""
        check_hf_directory(Path(path), self.model_config.architecture)
        return super().get_hf_storage_reader(path, from_quantized)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf = {}
        for key, value in state_dict.items():
            if key == LM_HEAD and self.tied:
                continue
            hf[self._hf_key(key)] = value
        if self.per_expert_bases:
            self._fused_targets = {k: v for k, v in hf.items() if _FUSED.match(k)}
            hf = split_experts_for_reading(hf, self.per_expert_bases)
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        if self.per_expert_bases:
            hf_state_dict = fuse_experts_after_reading(hf_state_dict, self._fused_targets)
        state = {}
        for key, value in hf_state_dict.items():
            state[TEXT_PREFIX + key[len(self.decoder_prefix):] if key.startswith(self.decoder_prefix) else key] = value
        if self.tied:
            state[LM_HEAD] = state[EMBEDDING]
        return state
