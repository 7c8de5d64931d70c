"""The trainer's HF initial load of a published-layout directory (multimodal keys in one unsharded
model.safetensors, per-expert MoE keys, an MTP head) and the export of its checkpoint back to that layout."""

import shutil

import pytest

import torch

import qwen35
from hf_oracle import force_torch_path
from qwen35.hf_io import checkpoint_state
from test_published_layout import _fake_published, _tensors
from test_train_helpers import DEBUG_TOML, debug_assets, train
from torchtitan_ext.export_hf import load_dcp_model, main as export_main


def test_trainer_loads_published_moe_directory_and_exports_it_back(tmp_path, monkeypatch):
    import tiny_configs
    flavor = qwen35.Qwen35Config.from_flavor("debug-moe")
    monkeypatch.setitem(tiny_configs.TINY_CONFIGS, "debug-moe", flavor)
    source = _fake_published("debug-moe", tmp_path / "source", sharded=False)
    assert (source / "model.safetensors").is_file() and not (source / "model.safetensors.index.json").exists()
    keys = set(_tensors(source))  # transformers saves the decoder's experts per expert, as does the MTP layer
    assert {"model.language_model.layers.0.mlp.experts.7.down_proj.weight",
            "mtp.layers.0.mlp.experts.7.up_proj.weight"} <= keys
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(debug_assets() / name, source / name)
    # One step at lr 0 with the MTP loss: the checkpoint holds exactly the loaded weights, MTP head included.
    train(tmp_path / "run", "--model.flavor", "debug-moe", "--model.hf_assets_path", str(source),
          "--model.mtp_loss_weight", "0.3", "--training.steps", "1", "--optimizer.lr", "0",
          "--checkpoint.enable", "true", "--checkpoint.initial_load_path", str(source),
          "--checkpoint.initial_load_in_hf", "true")
    expected = qwen35.load_pretrained(source)
    step = tmp_path / "run" / "checkpoint" / "step-1"
    config = qwen35.Qwen35Config(**{**flavor.__dict__, "mtp_num_hidden_layers": 1})
    loaded = load_dcp_model(config, step)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    toml = tmp_path / "debug_moe_mtp.toml"
    toml.write_text(DEBUG_TOML.read_text().replace('flavor = "debug"', 'flavor = "debug-moe"\nmtp_loss_weight = 0.3'))
    export_main(["--config", str(toml), "--checkpoint", str(step), "--output", str(tmp_path / "hf"),
                 "--layout", "published", "--source", str(source), "--dtype", "float32"])
    exported, original = _tensors(tmp_path / "hf"), _tensors(source)
    assert all(torch.equal(exported[k], v) for k, v in original.items() if k.startswith("model.visual."))
    assert all(torch.equal(exported[k], v) for k, v in checkpoint_state(loaded).items() if k.startswith("mtp."))
    from transformers import AutoModelForImageTextToText
    force_torch_path()
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(2, flavor.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - loaded.eval()(ids)).abs().max().item() <= 1e-5


def test_last_save_in_hf_is_refused_with_the_export_command(tmp_path):
    from test_train_helpers import debug_args
    from torchtitan_ext.toml_config import ConfigError
    from torchtitan_ext.train import load_config
    with pytest.raises(ConfigError, match=r"last_save_in_hf = true is not supported.*torchtitan_ext\.export_hf"):
        load_config(debug_args(tmp_path, "--checkpoint.last_save_in_hf", "true"))
