"""Random tiny configs covering tied/untied embeddings, GQA ratios 1/2/4 and value-head groups 1/2/3, dense and MoE."""

from qwen35 import Qwen35Config


def tiny(**overrides) -> Qwen35Config:
    base = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                intermediate_size=128, vocab_size=512, mrope_section=[2, 1, 1], max_position_embeddings=1024,
                eos_token_id=1)
    base.update(overrides)
    return Qwen35Config(**base)


_MOE = dict(intermediate_size=None, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48)

TINY_CONFIGS = {
    "dense_untied_gqa2_hv2x": tiny(),
    "dense_tied_gqa4_hv1x": tiny(tie_word_embeddings=True, num_attention_heads=8, linear_num_value_heads=2),
    "dense_mha_hv3x": tiny(num_key_value_heads=4, linear_num_key_heads=1, linear_num_value_heads=3,
                           num_hidden_layers=5),
    "moe_untied": tiny(**_MOE),
    "moe_tied_hv2x": tiny(tie_word_embeddings=True, **_MOE),
}
