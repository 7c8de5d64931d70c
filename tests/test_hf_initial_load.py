"""Initial weights from an HF directory (issue 14 item 2): its config.json must describe the training config's
architecture (flavor after [model] overrides) and its safetensors must hold exactly that model's tensors
(vision/MTP excepted). Checked where torchtitan opens the directory: the adapter's get_hf_storage_reader."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from torchtitan_ext.model_spec import model_registry
from torchtitan_ext.state_dict_adapter import HFCheckpointMismatch, Qwen35StateDictAdapter


def _hf_dir(path, config):
    torch.manual_seed(0)
    qwen35.save_pretrained(Qwen35ForCausalLM(config), path)
    return path


def _open(hf_dir, architecture):
    spec = model_registry("debug", architecture=architecture)
    adapter = Qwen35StateDictAdapter(spec.model, str(hf_dir))
    return adapter.get_hf_storage_reader(str(hf_dir))


def _add_tensors(hf_dir, **tensors):
    path = hf_dir / "model.safetensors"
    stored = load_file(path)
    stored.update(tensors)
    save_file(stored, path)


DEBUG = Qwen35Config.from_flavor("debug")


def test_matching_directory_with_mtp_and_vision_tensors_opens(tmp_path):
    hf_dir = _hf_dir(tmp_path, DEBUG)
    _add_tensors(hf_dir, **{"mtp.fc.weight": torch.zeros(2, 2), "model.visual.patch_embed.weight": torch.zeros(2)})
    assert _open(hf_dir, DEBUG) is not None


@pytest.mark.parametrize("field, theirs, ours", [
    ("rope_theta", 1e6, DEBUG.rope_theta),  # same tensors, different positions: silently wrong before
    ("tie_word_embeddings", False, True),  # a TOML override ([model] tie_word_embeddings = true) counts
])
def test_config_json_differing_from_the_flavor_names_the_field(tmp_path, field, theirs, ours):
    hf_dir = _hf_dir(tmp_path, dataclasses.replace(DEBUG, **{field: theirs}))
    with pytest.raises(HFCheckpointMismatch, match=rf"config.json: {field} = {theirs!r}, but the training config "
                                                   rf"\(\[model\] flavor and overrides\) has {field} = {ours!r}"):
        _open(hf_dir, dataclasses.replace(DEBUG, **{field: ours}))


def test_extra_tensor_is_refused(tmp_path):
    hf_dir = _hf_dir(tmp_path, DEBUG)
    _add_tensors(hf_dir, **{"model.language_model.layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(HFCheckpointMismatch, match=r"1 unexpected tensor\(s\).*'model.layers.0.extra.weight'"):
        _open(hf_dir, DEBUG)
