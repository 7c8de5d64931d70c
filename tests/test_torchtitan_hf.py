"""HF interop of the torchtitan integration: DCP -> HF export that transformers loads with our logits, initial
weights from an HF directory, and the state-dict adapter's renames."""

import json
import shutil

import pytest
import torch

from test_train_helpers import DEBUG_TOML, debug_assets, train
import qwen35
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from torchtitan_ext.export_hf import load_dcp_model, main as export_main
from torchtitan_ext.model_spec import model_registry
from torchtitan_ext.state_dict_adapter import Qwen35StateDictAdapter


def test_export_loads_in_transformers_with_our_logits(tmp_path):
    train(tmp_path / "run", "--training.steps", "2", "--checkpoint.enable", "true", "--checkpoint.interval", "2")
    step = tmp_path / "run" / "checkpoint" / "step-2"
    export_main(["--config", str(DEBUG_TOML), "--checkpoint", str(step), "--output", str(tmp_path / "hf")])

    from hf_oracle import force_torch_path
    from transformers import AutoModelForCausalLM
    force_torch_path()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_dcp_model(Qwen35Config.from_flavor("debug"), step).eval()
    ids = torch.randint(0, 2048, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    # the weights are the trained ones, not a fresh init
    assert not torch.equal(ours.lm_head.weight, Qwen35ForCausalLM(ours.config).lm_head.weight)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_export_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a DCP checkpoint"):
        load_dcp_model(Qwen35Config.from_flavor("debug"), tmp_path)


def test_initial_weights_from_hf_directory(tmp_path):
    torch.manual_seed(123)
    pretrained = Qwen35ForCausalLM(Qwen35Config.from_flavor("debug"))
    hf_dir = tmp_path / "pretrained"
    qwen35.save_pretrained(pretrained, hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(debug_assets() / name, hf_dir / name)
    # One step at lr 0: the model-only checkpoint of the last step holds exactly the loaded weights.
    train(tmp_path / "run", "--model.hf_assets_path", str(hf_dir), "--training.steps", "1", "--optimizer.lr", "0",
          "--checkpoint.enable", "true", "--checkpoint.initial_load_path", str(hf_dir),
          "--checkpoint.initial_load_in_hf", "true")
    loaded = load_dcp_model(pretrained.config, tmp_path / "run" / "checkpoint" / "step-1")
    for key, value in pretrained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("flavor", list(qwen35.FLAVORS))
def test_every_flavor_has_a_model_spec(flavor):
    spec = model_registry(flavor)
    assert spec.flavor == flavor and spec.model.architecture == Qwen35Config.from_flavor(flavor)
    assert spec.state_dict_adapter is Qwen35StateDictAdapter


def test_adapter_keeps_tied_embeddings_tied_and_maps_multimodal_prefix(tmp_path):
    tied = model_registry("0.8B").model
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.language_model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.visual.blocks.0.attn.qkv.weight": "model-00002-of-00002.safetensors"}}))
    adapter = Qwen35StateDictAdapter(tied, str(tmp_path))
    embed = torch.zeros(3)
    state = {"model.embed_tokens.weight": embed, "lm_head.weight": embed, "model.norm.weight": torch.ones(1)}
    hf = adapter.to_hf(state)
    assert set(hf) == {"model.language_model.embed_tokens.weight", "model.language_model.norm.weight"}
    back = adapter.from_hf(hf)
    assert set(back) == set(state) and back["lm_head.weight"] is back["model.embed_tokens.weight"]

    untied = Qwen35StateDictAdapter(model_registry("9B").model, None)
    assert untied.to_hf(state) == state and untied.from_hf(state) == state
