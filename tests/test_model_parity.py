"""Our model vs transformers 5.23.0 (torch path), fp32: logits, HF import/export, round trip."""

import pytest
import torch
from safetensors.torch import load_file

import qwen35
from hf_oracle import hf_causal_lm, hf_vlm
from tiny_configs import TINY_CONFIGS

ATOL = 1e-5


def _inputs(config, batch=2, seq=70, seed=0):
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    config = TINY_CONFIGS[name]
    hf = hf_causal_lm(config)
    hf.save_pretrained(tmp_path)
    ours = qwen35.load_pretrained(tmp_path).eval()
    ids = _inputs(config)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", ["dense_untied_gqa2_hv2x", "moe_untied"])
def test_multimodal_checkpoint_loads_text_decoder(name, tmp_path, caplog):
    """A Qwen3_5(Moe)ForConditionalGeneration checkpoint: `model.language_model.*` keys, vision tower skipped."""
    config = TINY_CONFIGS[name]
    hf = hf_vlm(config)
    hf.save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="qwen35.hf_io"):
        ours = qwen35.load_pretrained(tmp_path).eval()
    assert any("model.visual.*" in r.getMessage() for r in caplog.records)
    ids = _inputs(config, seq=40)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("tie", [False, True])
def test_multimodal_top_level_tie_wins(tie, tmp_path):
    config = TINY_CONFIGS["dense_untied_gqa2_hv2x"]
    hf = hf_vlm(config.__class__(**{**config.__dict__, "tie_word_embeddings": tie}))
    hf.config.text_config.tie_word_embeddings = not tie  # must be ignored
    hf.save_pretrained(tmp_path)
    assert qwen35.load_pretrained(tmp_path).config.tie_word_embeddings is tie


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_export_loads_in_transformers_and_round_trips_bit_exact(name, tmp_path):
    from transformers import AutoModelForCausalLM

    config = TINY_CONFIGS[name]
    hf = hf_causal_lm(config)
    hf.save_pretrained(tmp_path / "hf")
    ours = qwen35.load_pretrained(tmp_path / "hf")
    qwen35.save_pretrained(ours, tmp_path / "ours")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = _inputs(config, seq=33)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
    original, exported = hf.state_dict(), reloaded.state_dict()
    assert original.keys() == exported.keys()
    for key in original:
        assert torch.equal(original[key], exported[key]), key

    # ours -> HF dir -> ours is the identity too
    again = qwen35.load_pretrained(tmp_path / "ours")
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key


def test_sharded_save_with_index(tmp_path):
    config = TINY_CONFIGS["dense_untied_gqa2_hv2x"]
    model = qwen35.Qwen35ForCausalLM(config)
    qwen35.save_pretrained(model, tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    total = sum(len(load_file(s)) for s in shards)
    assert total == len(model.state_dict())
    reloaded = qwen35.load_pretrained(tmp_path)
    ids = _inputs(config, seq=10)
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_moe_load_balancing_loss_matches_transformers(tmp_path):
    config = TINY_CONFIGS["moe_untied"]
    hf = hf_causal_lm(config)
    hf.save_pretrained(tmp_path)
    ours = qwen35.load_pretrained(tmp_path).eval()
    ids = _inputs(config, seq=50)
    with torch.no_grad():
        expected = hf(ids, output_router_logits=True)
        logits, aux_loss = ours(ids, return_aux_loss=True)
    assert (logits - expected.logits).abs().max().item() <= ATOL
    assert abs(aux_loss.item() - expected.aux_loss.item()) <= 1e-6
