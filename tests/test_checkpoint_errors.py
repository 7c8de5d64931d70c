"""Bad checkpoints raise with the key and shapes; nothing is returned half-loaded."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35
from tiny_configs import TINY_CONFIGS


@pytest.fixture
def dense_dir(tmp_path):
    torch.manual_seed(0)
    qwen35.save_pretrained(qwen35.Qwen35ForCausalLM(TINY_CONFIGS["dense_untied_gqa2_hv2x"]), tmp_path)
    return tmp_path


def _edit(directory, fn):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_tensor(dense_dir):
    _edit(dense_dir, lambda t: t.pop("model.layers.1.linear_attn.A_log"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*'model.layers.1.linear_attn.A_log' \(expected shape \(4,\)\)"):
        qwen35.load_pretrained(dense_dir)


def test_unexpected_tensor(dense_dir):
    _edit(dense_dir, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3, 2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*'model.layers.0.extra.weight' with shape \(3, 2\)"):
        qwen35.load_pretrained(dense_dir)


def test_misshaped_tensor(dense_dir):
    _edit(dense_dir, lambda t: t.update({"model.norm.weight": torch.zeros(63)}))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(63,\) in the checkpoint, the model "
                                         r"expects \(64,\)"):
        qwen35.load_pretrained(dense_dir)


def test_mtp_tensors_without_a_declared_head_skipped_with_one_log_line(dense_dir, caplog):
    _edit(dense_dir, lambda t: t.update({"mtp.fc.weight": torch.zeros(64, 128), "mtp.norm.weight": torch.zeros(64)}))
    with caplog.at_level(logging.INFO, logger="qwen35.hf_io"):
        qwen35.load_pretrained(dense_dir)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "skipped 2 mtp.* tensors (config.json declares no MTP head)" in lines[0]


def test_tied_config_with_different_lm_head(tmp_path):
    model = qwen35.Qwen35ForCausalLM(TINY_CONFIGS["dense_tied_gqa4_hv1x"])
    qwen35.save_pretrained(model, tmp_path)
    _edit(tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}))
    with pytest.raises(ValueError, match="ties lm_head"):
        qwen35.load_pretrained(tmp_path)


def test_per_expert_checkpoint_missing_an_expert(tmp_path):
    config = TINY_CONFIGS["moe_untied"]
    model = qwen35.Qwen35ForCausalLM(config)
    qwen35.save_pretrained(model, tmp_path)

    def split_experts(t):
        for layer in range(config.num_hidden_layers):
            base = f"model.layers.{layer}.mlp.experts"
            gate_up, down = t.pop(f"{base}.gate_up_proj"), t.pop(f"{base}.down_proj")
            for e in range(config.num_experts):
                gate, up = gate_up[e].chunk(2)
                t[f"{base}.{e}.gate_proj.weight"] = gate.contiguous()
                t[f"{base}.{e}.up_proj.weight"] = up.contiguous()
                t[f"{base}.{e}.down_proj.weight"] = down[e].contiguous()

    _edit(tmp_path, split_experts)
    reloaded = qwen35.load_pretrained(tmp_path)  # per-expert layout loads to the same fused tensors
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[key]), key
    _edit(tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing model.layers.2.mlp.experts.5.up_proj.weight"):
        qwen35.load_pretrained(tmp_path)


def test_missing_files(tmp_path, dense_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen35.load_pretrained(tmp_path / "nowhere")
    (dense_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        qwen35.load_pretrained(dense_dir)


def test_index_pointing_to_missing_shard(tmp_path):
    qwen35.save_pretrained(qwen35.Qwen35ForCausalLM(TINY_CONFIGS["dense_untied_gqa2_hv2x"]), tmp_path,
                           max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        qwen35.load_pretrained(tmp_path)
