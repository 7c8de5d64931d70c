"""transformers 5.23.0 as the oracle: tiny random HF models on its torch path, built from our configs."""

from __future__ import annotations

import torch

from qwen35 import Qwen35Config


def force_torch_path() -> None:
    """Bind transformers' Qwen3.5 delta-rule and conv entry points to its own torch code, whatever optional
    kernel packages (fla, causal_conv1d, kernel hub) are importable: those bind GPU kernels at import."""
    from transformers.models.qwen3_5 import modeling_qwen3_5
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe

    for module in (modeling_qwen3_5, modeling_qwen3_5_moe):
        for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                     "causal_conv1d_update"):
            fn = getattr(module, name)
            setattr(module, name, getattr(fn, "__wrapped__", fn))


def hf_text_config(config: Qwen35Config):
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    hf = config.to_hf_dict()
    cls = Qwen3_5MoeTextConfig if config.is_moe else Qwen3_5TextConfig
    for key in ("architectures", "model_type", "dtype"):
        hf.pop(key)
    return cls(**hf)


def hf_vlm_config(config: Qwen35Config):
    """A tiny multimodal (`qwen3_5` / `qwen3_5_moe`) config around our text config."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    text = hf_text_config(config).to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=config.hidden_size, num_position_embeddings=16)
    cls = Qwen3_5MoeConfig if config.is_moe else Qwen3_5Config
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=config.tie_word_embeddings)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (norm weights included), so the (1+w) and gated-norm parameterizations
    are actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 1)
            elif p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def hf_causal_lm(config: Qwen35Config, seed: int = 0):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM

    force_torch_path()
    torch.manual_seed(seed)
    cls = Qwen3_5MoeForCausalLM if config.is_moe else Qwen3_5ForCausalLM
    return randomize_(cls(hf_text_config(config)), seed).eval()


def hf_vlm(config: Qwen35Config, seed: int = 0):
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    force_torch_path()
    torch.manual_seed(seed)
    cls = Qwen3_5MoeForConditionalGeneration if config.is_moe else Qwen3_5ForConditionalGeneration
    return randomize_(cls(hf_vlm_config(config)), seed).eval()
