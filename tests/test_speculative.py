"""Speculative greedy decoding with the MTP head: token-identical to plain greedy on a left-padded batch, with
every draft rejected (random head) and with a head trained briefly on the debug corpus (drafts accepted)."""

import dataclasses

import pytest
import torch
from pydoc_data.topics import topics

import qwen35
from qwen35.decoding import SpeculationStats
from mtp_training import corpus_windows, train_with_mtp
from tiny_configs import TINY_CONFIGS

NEW_TOKENS = 64


def _left_padded_prompts(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def _assert_speculation_is_greedy(model, ids, mask) -> SpeculationStats:
    stats = SpeculationStats()
    expected = qwen35.generate(model, ids, NEW_TOKENS, padding_mask=mask, eos_token_id=[])
    got = qwen35.generate(model, ids, NEW_TOKENS, padding_mask=mask, eos_token_id=[], speculative="mtp", stats=stats)
    assert torch.equal(got, expected)
    assert stats.new_tokens == NEW_TOKENS and stats.drafted > 0
    return stats


@pytest.mark.parametrize("flavor", ["debug", "debug-moe"])
def test_random_mtp_head_rejects_and_output_stays_greedy(flavor):
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config.from_flavor(flavor, mtp_num_hidden_layers=1)).eval()
    g = torch.Generator().manual_seed(0)
    ids, mask = _left_padded_prompts([torch.randint(2, 2048, (n,), generator=g) for n in (12, 8, 5)])
    stats = _assert_speculation_is_greedy(model, ids, mask)
    assert stats.accepted < stats.drafted  # the rollback path ran


def _corpus_bytes() -> torch.Tensor:
    """Some of the debug corpus (pydoc's language-reference topics) as byte ids."""
    text = "\n".join(topics[name] for name in sorted(topics)[:20])
    return torch.tensor(list(text.encode()), dtype=torch.long)


@pytest.mark.parametrize("name", ["dense_untied_gqa2_hv2x", "moe_untied"])
def test_trained_mtp_head_drafts_are_accepted_and_output_stays_greedy(name):
    data = _corpus_bytes()
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(dataclasses.replace(TINY_CONFIGS[name], mtp_num_hidden_layers=1))
    train_with_mtp(model, lambda g: corpus_windows(data, 4, 32, g), steps=30, lr=3e-3)
    ids, mask = _left_padded_prompts([data[100:116], data[2000:2011], data[5000:5008]])
    stats = _assert_speculation_is_greedy(model, ids, mask)
    assert stats.accepted > 0 and stats.verify_steps < NEW_TOKENS - 1
    # rows finishing at different positions (EOS = a frequent byte): the same early stop and padding as greedy
    eos = dict(eos_token_id=[ord("h")], pad_token_id=3)
    expected = qwen35.generate(model, ids, NEW_TOKENS, padding_mask=mask, **eos)
    assert torch.equal(qwen35.generate(model, ids, NEW_TOKENS, padding_mask=mask, speculative="mtp", **eos), expected)


def test_compiled_speculative_steps_generate_the_same_tokens():
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config.from_flavor("debug", mtp_num_hidden_layers=1)).eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = _left_padded_prompts([torch.randint(2, 2048, (n,), generator=g) for n in (9, 6)])
    expected = qwen35.generate(model, ids, 12, padding_mask=mask, eos_token_id=[])
    got = qwen35.generate(model, ids, 12, padding_mask=mask, eos_token_id=[], speculative="mtp", compile=True)
    assert torch.equal(got, expected)
