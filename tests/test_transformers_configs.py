"""Every config that transformers itself saves, loads and runs loads here with the same logits (issue 14 item
12): transformers' own tester configs for qwen3_5 / qwen3_5_moe (copied from its tests/models/qwen3_5*/ and
tests/causal_lm_tester.py, which are not shipped in the wheel) and its default Qwen3_5TextConfig at a small
head_dim. They carry an mrope_section that is missing or does not sum to rotary_dim / 2 (no effect on text-only
positions) and a moe_intermediate_size that is not a multiple of 8 (the grouped GEMM's alignment)."""

import logging

import pytest
import torch

from hf_oracle import force_torch_path, randomize_
import qwen35
import qwen35.config

# CausalLMModelTester defaults, as the Qwen3.5 text testers use them.
_TESTER_COMMON = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=37, hidden_act="silu", max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, layer_types=["full_attention", "linear_attention"],
                      linear_conv_kernel_dim=2, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_num_key_heads=4, linear_num_value_heads=8)


def _text_tester():  # Qwen3_5TextModelTester
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(**_TESTER_COMMON, head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 10_000, "mrope_section": [2, 1, 1], "mrope_interleaved": True})


def _moe_text_tester():  # Qwen3_5MoeTextModelTester: head_dim = 32 // 2, default rope, moe_intermediate_size 12
    from transformers import Qwen3_5MoeTextConfig

    common = {k: v for k, v in _TESTER_COMMON.items() if k != "intermediate_size"}
    return Qwen3_5MoeTextConfig(**common, head_dim=16, moe_intermediate_size=12, shared_expert_intermediate_size=36,
                                num_experts_per_tok=2, num_experts=8)


def _moe_vlm_tester():  # Qwen3_5MoeVisionText2TextModelTester: mrope [16, 8, 8] with head_dim 8
    from transformers import Qwen3_5MoeConfig

    text = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_act="silu", head_dim=8, hidden_size=32,
                vocab_size=99, intermediate_size=37, max_position_embeddings=512, model_type="qwen3_5_moe_text",
                num_attention_heads=4, num_hidden_layers=2, layer_types=["full_attention", "linear_attention"],
                num_key_value_heads=2, rope_theta=10000, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 8, 8], "mrope_interleaved": True},
                linear_conv_kernel_dim=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=4,
                linear_num_value_heads=8, moe_intermediate_size=16, shared_expert_intermediate_size=36,
                num_experts_per_tok=2, num_experts=8)
    vision = dict(depth=2, in_chans=3, hidden_act="gelu_pytorch_tanh", intermediate_size=32, out_hidden_size=32,
                  hidden_size=32, num_heads=4, patch_size=16, spatial_merge_size=1, temporal_patch_size=2,
                  num_position_embeddings=16)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, image_token_id=3, video_token_id=4,
                            vision_start_token_id=5, vision_end_token_id=6, tie_word_embeddings=True)


def _default_text_small_head_dim():  # transformers' defaults (no mrope_section), shrunk to test size
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(head_dim=16, hidden_size=64, intermediate_size=96, num_hidden_layers=4, vocab_size=128,
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                             linear_value_head_dim=16)


CONFIGS = {"qwen3_5_text_tester": _text_tester, "qwen3_5_moe_text_tester": _moe_text_tester,
           "qwen3_5_moe_vlm_tester": _moe_vlm_tester, "qwen3_5_text_default_head_dim16": _default_text_small_head_dim}


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_config_loads_with_its_logits(name, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(qwen35.config, "_warned", set())  # each case sees its own once-only warning
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    force_torch_path()
    config = CONFIGS[name]()
    torch.manual_seed(0)
    vlm = hasattr(config, "text_config")
    theirs = randomize_((AutoModelForImageTextToText if vlm else AutoModelForCausalLM).from_config(
        config, dtype=torch.float32)).eval()
    theirs.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qwen35.config"):
        ours = qwen35.load_pretrained(tmp_path).eval()
    ids = torch.randint(0, 99, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rope = (config.text_config if vlm else config).rope_parameters
    rotary_half = int(ours.config.head_dim * ours.config.partial_rotary_factor) // 2
    if sum(rope.get("mrope_section", [])) != rotary_half:
        assert any("mrope_section" in r.getMessage() for r in caplog.records)


def test_grouped_experts_with_unaligned_intermediate_size_in_bfloat16():
    # moe_intermediate_size 12 (the MoE tester's): torch._grouped_mm rejected bf16 ("strides should be multiple
    # of 16 bytes"); the padded weights give the per-expert loop's result, and gradients reach the real weights.
    from qwen35.moe import GroupedExperts

    config = qwen35.Qwen35Config.from_hf_dict({**_moe_text_tester().to_dict(), "model_type": "qwen3_5_moe_text"})
    experts = GroupedExperts(config)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, config.hidden_size, generator=gen)
    expert_ids = torch.randint(0, config.num_experts, (10, 2), generator=gen)
    weights = torch.rand(10, 2, generator=gen)
    want = torch.zeros(10, config.hidden_size, dtype=torch.float64)
    for token in range(10):
        for slot in range(2):
            gate_up, down = (p[expert_ids[token, slot]].double() for p in (experts.gate_up_proj, experts.down_proj))
            gate, up = (gate_up @ x[token].double()).chunk(2)
            want[token] += weights[token, slot] * (down @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(experts(x, expert_ids, weights).double(), want, atol=1e-6, rtol=1e-6)
    bf16 = experts.to(torch.bfloat16)
    got = bf16(x.bfloat16(), expert_ids, weights.bfloat16())
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-2)
    got.float().sum().backward()
    assert bf16.gate_up_proj.grad.shape == (8, 24, 32) and bf16.down_proj.grad.shape == (8, 32, 12)
