"""Config: flavors reproduce published parameter totals; HF config.json read/write; validation errors."""

import json

import pytest
import torch

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.config import FULL_ATTENTION
from qwen35.model import DecoderLayer

# Published safetensors totals (full VLM + 1-layer MTP head), reference table section 10.
PUBLISHED_TOTALS = {"9B": 9_653_104_368, "35B-A3B": 35_951_822_704}
VISION_27_1152 = dict(depth=27, width=1152, mlp=4304)


def vision_tower_params(depth, width, mlp, out, patch=16, temporal=2, channels=3, positions=2304, merge=2):
    """Qwen3.5 vision tower parameter count from its state-dict keys (architecture reference 8.3)."""
    patch_embed = width * channels * temporal * patch * patch + width
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) + (mlp * width + mlp) \
        + (width * mlp + width)
    merged = width * merge * merge
    merger = 2 * width + (merged * merged + merged) + (out * merged + out)
    return patch_embed + positions * width + depth * block + merger


def mtp_params(config):
    """MTP head: fc [H, 2H], three norms [H] and one full-attention decoder layer (embeddings shared)."""
    with torch.device("meta"):
        layer = DecoderLayer(config, config.layer_types.index(FULL_ATTENTION))
    return 2 * config.hidden_size ** 2 + 3 * config.hidden_size + sum(p.numel() for p in layer.parameters())


def meta_model(flavor):
    with torch.device("meta"):
        return Qwen35ForCausalLM(Qwen35Config.from_flavor(flavor))


@pytest.mark.parametrize("flavor", sorted(PUBLISHED_TOTALS))
def test_full_size_parameter_counts_match_published_totals(flavor):
    model = meta_model(flavor)
    config = model.config
    total = model.num_parameters() + vision_tower_params(**VISION_27_1152, out=config.hidden_size) + mtp_params(config)
    assert total == PUBLISHED_TOTALS[flavor]


def test_0_8b_text_model_size():
    model = meta_model("0.8B")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.numel() == 248320 * 1024
    assert round(model.num_parameters() / 1e9, 3) == 0.752  # tied weight counted once
    assert round(model.num_parameters(exclude_embeddings=True) / 1e9, 3) == 0.498


@pytest.mark.parametrize("flavor", ["0.8B", "2B", "4B", "9B", "27B", "35B-A3B", "122B-A10B", "397B-A17B"])
def test_published_flavors_derived_sizes(flavor):
    config = Qwen35Config.from_flavor(flavor)
    assert config.rotary_dim == 64 and config.layer_types.count(FULL_ATTENTION) * 4 == config.num_hidden_layers
    assert config.conv_dim == 4096 + 128 * config.linear_num_value_heads


def _published_0_8b_multimodal_json():
    """Shape of the published Qwen3.5-0.8B config.json (multimodal wrapper, text_config inside)."""
    text = Qwen35Config.from_flavor("0.8B").to_hf_dict()
    text.pop("architectures")
    text["model_type"] = "qwen3_5_text"
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "tie_word_embeddings": True, "text_config": text, "vision_config": {"depth": 12}}


def test_read_multimodal_and_text_only_configs(tmp_path):
    hf = _published_0_8b_multimodal_json()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    config = Qwen35Config.from_hf_file(path)
    assert config == Qwen35Config.from_flavor("0.8B")
    assert Qwen35Config.from_hf_dict(config.to_hf_dict()) == config
    moe = Qwen35Config.from_flavor("35B-A3B")
    assert Qwen35Config.from_hf_dict(moe.to_hf_dict()) == moe
    assert moe.to_hf_dict()["model_type"] == "qwen3_5_moe_text"


def test_transformers_reads_our_config():
    from transformers import AutoConfig

    hf = Qwen35Config.from_flavor("9B").to_hf_dict()
    loaded = AutoConfig.for_model(**hf)
    assert loaded.rope_parameters["rope_theta"] == 1e7
    assert loaded.max_position_embeddings == 262144 and loaded.layer_types == hf["layer_types"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("hidden_size"), "missing required key(s) ['hidden_size']"),
    (lambda d: d["rope_parameters"].pop("rope_theta"), "rope_theta"),
    (lambda d: d.update(model_type="llama"), "not a Qwen3.5 model type"),
    (lambda d: d.update(num_key_value_heads=3), "num_attention_heads: must be a multiple of num_key_value_heads=3"),
    (lambda d: d.update(layer_types=d["layer_types"][:-1]), "layer_types: must have num_hidden_layers=24"),
    (lambda d: d["layer_types"].__setitem__(0, "sliding"), "layer_types: entries must be one of"),
    (lambda d: d.update(linear_num_value_heads=20), "linear_num_value_heads: must be a multiple of"),
])
def test_invalid_configs_name_field_and_rule(mutate, message):
    hf = Qwen35Config.from_flavor("0.8B").to_hf_dict()
    mutate(hf)
    with pytest.raises(ValueError) as err:
        Qwen35Config.from_hf_dict(hf, source="x/config.json")
    assert message in str(err.value) and "x/config.json" in str(err.value)


def test_mrope_section_not_splitting_rotary_dim_is_accepted_with_one_warning(caplog, monkeypatch):
    # transformers saves and runs such configs; mrope_section only moves image/video positions.
    import qwen35.config

    monkeypatch.setattr(qwen35.config, "_warned", set())
    hf = Qwen35Config.from_flavor("0.8B").to_hf_dict()
    hf["rope_parameters"].update(partial_rotary_factor=0.5)
    with caplog.at_level("WARNING", logger="qwen35.config"):
        config = Qwen35Config.from_hf_dict(hf)
        Qwen35Config.from_hf_dict(hf)
    assert config.partial_rotary_factor == 0.5 and config.mrope_section == [11, 11, 10]
    assert [r.getMessage() for r in caplog.records] == [
        "Qwen35Config.mrope_section = [11, 11, 10] does not split rotary_dim / 2 = 64; it only matters for "
        "image/video positions, which this text model does not use, so it is ignored"]
    del hf["rope_parameters"]["mrope_section"]
    assert Qwen35Config.from_hf_dict(hf).to_hf_dict()["rope_parameters"].keys() == hf["rope_parameters"].keys()


def test_odd_rotary_dim_rejected():
    with pytest.raises(ValueError, match="must be even"):
        Qwen35Config.from_flavor("debug", head_dim=20, partial_rotary_factor=0.25)


def test_unknown_flavor():
    with pytest.raises(ValueError, match="unknown Qwen3.5 flavor '1B'.*0.8B"):
        Qwen35Config.from_flavor("1B")
