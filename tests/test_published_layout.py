"""The published (multimodal) layout end to end: a fake published directory built with transformers' classes
(bf16, model.language_model.*, model.visual.*, mtp.* with per-expert MoE keys; one file or sharded) -> load ->
a few training steps with the MTP loss -> export to the published layout -> transformers loads it."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qwen35
from hf_oracle import force_torch_path, hf_vlm
from mtp_training import train_with_mtp
from qwen35.hf_io import checkpoint_state, save_published
from tiny_configs import TINY_CONFIGS


def _tensors(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _fake_published(name, directory, sharded):
    """A transformers-saved tiny multimodal checkpoint in bf16 plus an MTP head as published checkpoints ship it."""
    config = TINY_CONFIGS[name]
    hf = hf_vlm(config).to(torch.bfloat16)
    hf.save_pretrained(directory, max_shard_size="100KB" if sharded else "1GB")
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6}))
    (directory / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    torch.manual_seed(1)
    with_mtp = qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config(**{**config.__dict__, "mtp_num_hidden_layers": 1}))
    mtp = {k: v.to(torch.bfloat16) for k, v in checkpoint_state(with_mtp).items() if k.startswith("mtp.")}
    cfg = json.loads((directory / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    (directory / "config.json").write_text(json.dumps(cfg))
    if sharded:
        save_file(mtp, directory / "model-mtp.safetensors", metadata={"format": "pt"})
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        index["weight_map"].update(dict.fromkeys(mtp, "model-mtp.safetensors"))
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({**_tensors(directory), **mtp}, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("name,sharded", [("dense_tied_gqa4_hv1x", False), ("moe_untied", True)])
def test_load_train_with_mtp_export_published_and_transformers_loads_it(name, sharded, tmp_path):
    source = _fake_published(name, tmp_path / "source", sharded)
    source_tensors = _tensors(source)
    assert any(".mlp.experts.0." in k for k in source_tensors if k.startswith("mtp.")) == ("moe" in name)

    model = qwen35.load_pretrained(source)
    assert model.mtp is not None and next(model.parameters()).dtype == torch.float32
    assert torch.equal(model.mtp.fc.weight, source_tensors["mtp.fc.weight"].float())
    vocab = model.config.vocab_size
    train_with_mtp(model, lambda g: torch.randint(2, vocab, (2, 17), generator=g), steps=5, lr=1e-3)

    out = tmp_path / "exported"
    save_published(model, out, source, dtype=torch.float32)
    exported = _tensors(out)
    assert sharded == (out / "model.safetensors.index.json").exists()
    for key, value in source_tensors.items():
        if key.startswith("model.visual."):
            assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], value), key
    ours = checkpoint_state(model)
    for key, value in ours.items():
        if key.startswith("mtp."):
            assert torch.equal(exported[key], value), key
    assert {k for k in exported if k.startswith("mtp.")} == {k for k in source_tensors if k.startswith("mtp.")}
    for name_ in ("generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name_).read_bytes() == (source / name_).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"] == json.loads((source / "config.json").read_text())["vision_config"]

    from transformers import AutoModelForImageTextToText
    force_torch_path()
    hf = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(2, vocab, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids)).abs().max().item() <= 1e-5
    # the default dtype is the source's; the reloaded model equals the trained one rounded to it
    save_published(model, tmp_path / "bf16", source)
    reloaded = qwen35.load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value.to(torch.bfloat16)), key


def test_export_refuses_a_source_of_another_architecture(tmp_path):
    source = _fake_published("dense_untied_gqa2_hv2x", tmp_path / "source", sharded=False)
    config = qwen35.Qwen35Config(**{**TINY_CONFIGS["dense_untied_gqa2_hv2x"].__dict__, "mtp_num_hidden_layers": 1,
                                    "intermediate_size": 96})
    with pytest.raises(ValueError, match="intermediate_size = 128 there, 96 in the checkpoint"):
        save_published(qwen35.Qwen35ForCausalLM(config), tmp_path / "out", source)
    assert not (tmp_path / "out").exists()
