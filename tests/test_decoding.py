"""Decoding and packing: cache steps vs full forward, greedy generation vs transformers, left padding,
sampling, EOS, packed documents vs separate forwards."""

import dataclasses

import pytest
import torch

import qwen35
from qwen35 import decoding, gated_deltanet
from qwen35.decoding import CPU_COMPILE_MIN_STEPS, compile_pays
from hf_oracle import hf_causal_lm
from tiny_configs import TINY_CONFIGS

ATOL = 1e-5


def _model(name, tmp_path):
    hf = hf_causal_lm(TINY_CONFIGS[name])
    hf.save_pretrained(tmp_path)
    return hf, qwen35.load_pretrained(tmp_path).eval()


def _ids(config, shape, seed=0):
    # avoid EOS in prompts so lengths are controlled by the test
    return torch.randint(2, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["dense_untied_gqa2_hv2x", "moe_tied_hv2x"])
def test_prefill_then_steps_and_continuation_equal_full_forward(name):
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(TINY_CONFIGS[name]).eval()
    ids = _ids(model.config, (2, 45))
    with torch.no_grad():
        full = model(ids)
        cache = qwen35.Qwen35Cache(model.config, 2, 45, torch.float32)
        pieces = [model(ids[:, :20], cache=cache)]                  # prefill (chunked)
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(20, 28)]  # one-token recurrent steps
        pieces.append(model(ids[:, 28:], cache=cache))              # multi-token continuation on the cache
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", ["dense_untied_gqa2_hv2x", "dense_tied_gqa4_hv1x", "moe_untied"])
def test_greedy_32_tokens_identical_to_transformers(name, tmp_path):
    hf, ours = _model(name, tmp_path)
    ids = _ids(ours.config, (1, 12))
    expected = hf.generate(ids, max_new_tokens=32, do_sample=False)
    got = qwen35.generate(ours, ids, max_new_tokens=32)
    assert torch.equal(got, expected)


def test_left_padded_batch_matches_single_prompt_generation(tmp_path):
    _, model = _model("dense_untied_gqa2_hv2x", tmp_path)
    long, short = _ids(model.config, (1, 15), seed=1), _ids(model.config, (1, 9), seed=2)
    pad = 0
    batch = torch.cat([long, torch.cat([torch.full((1, 6), pad), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    out = qwen35.generate(model, batch, 16, padding_mask=mask, eos_token_id=[], pad_token_id=pad)
    assert torch.equal(out[0], qwen35.generate(model, long, 16, eos_token_id=[])[0])
    assert torch.equal(out[1, 6:], qwen35.generate(model, short, 16, eos_token_id=[])[0])


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tmp_path):
    _, model = _model("dense_untied_gqa2_hv2x", tmp_path)
    ids = _ids(model.config, (2, 8))
    first = qwen35.generate(model, ids, 10, temperature=1.0, top_p=0.9, seed=3, eos_token_id=[])
    again = qwen35.generate(model, ids, 10, temperature=1.0, top_p=0.9, seed=3, eos_token_id=[])
    other = qwen35.generate(model, ids, 10, temperature=1.0, top_p=0.9, seed=4, eos_token_id=[])
    assert torch.equal(first, again) and not torch.equal(first, other)
    nucleus_of_one = qwen35.generate(model, ids, 10, temperature=1.0, top_p=1e-6, seed=5, eos_token_id=[])
    assert torch.equal(nucleus_of_one, qwen35.generate(model, ids, 10, eos_token_id=[]))


def test_stops_on_eos_and_pads_finished_rows(tmp_path):
    _, model = _model("dense_untied_gqa2_hv2x", tmp_path)
    ids = _ids(model.config, (2, 8))
    free = qwen35.generate(model, ids, 12, eos_token_id=[])
    eos = int(free[0, 8 + 3])  # row 0's 4th generated token becomes the EOS
    out = qwen35.generate(model, ids, 12, eos_token_id=eos, pad_token_id=7)
    stops = []
    for row in range(2):
        hits = (free[row, 8:] == eos).nonzero()
        stops.append(8 + int(hits[0]) + 1 if len(hits) else 20)
    assert out.shape[1] == max(stops)
    for row, stop in enumerate(stops):
        assert torch.equal(out[row, :stop], free[row, :stop])
        assert (out[row, stop:] == 7).all()


@pytest.mark.parametrize("name", ["dense_mha_hv3x", "moe_untied"])
def test_packed_documents_equal_separate_forwards(name):
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(TINY_CONFIGS[name]).eval()
    lengths = [37, 5, 70, 1, 19]
    docs = [_ids(model.config, (1, n), seed=i) for i, n in enumerate(lengths)]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), cu_seqlens=cu_seqlens)
        separate = torch.cat([model(d) for d in docs], dim=1)
    assert (packed - separate).abs().max().item() <= ATOL


def test_packed_gradients_do_not_cross_documents():
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(TINY_CONFIGS["dense_untied_gqa2_hv2x"])
    ids = _ids(model.config, (1, 30))
    cu_seqlens = torch.tensor([0, 12, 30], dtype=torch.int32)
    embeds = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: embeds.append(o.retain_grad() or o))
    logits = model(ids, cu_seqlens=cu_seqlens)
    hook.remove()
    logits[0, 12:].sum().backward()  # second document only
    assert embeds[0].grad[0, :12].abs().max().item() == 0.0
    assert embeds[0].grad[0, 12:].abs().max().item() > 0.0


def test_compiled_decode_steps_generate_the_same_tokens_without_recompiling_per_length_or_batch(tmp_path):
    _, model = _model("dense_untied_gqa2_hv2x", tmp_path)
    other = qwen35.Qwen35ForCausalLM(model.config).eval()  # same shapes, other weights
    graphs = torch._dynamo.utils.counters["stats"]
    compiled_graphs = []
    for run_model, batch, length, new in ((model, 2, 9, 12), (model, 3, 14, 9), (model, 4, 5, 10), (other, 4, 6, 10)):
        ids = _ids(model.config, (batch, length), seed=length)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # a left-padded row
        before = graphs["unique_graphs"]
        got = qwen35.generate(run_model, ids, new, padding_mask=mask, eos_token_id=[], compile=True)
        compiled_graphs.append(graphs["unique_graphs"] - before)
        assert torch.equal(got, qwen35.generate(run_model, ids, new, padding_mask=mask, eos_token_id=[], compile=False))
    # one step graph, recompiled once with the cache length symbolic and once with the batch and cache sizes
    # symbolic (a batch of one, whose size torch.compile always specialises, gets its own graphs); then none, for
    # any prompt length, batch or model of these shapes
    assert compiled_graphs[0] <= 2 and compiled_graphs[2:] == [0, 0]


def test_compiled_layers_calling_the_inplace_delta_rule_op_generate_the_same_tokens(monkeypatch):
    """CUDA's compiled decode on CPU: the step calls the in-place delta-rule op (on CUDA the Triton kernel), which
    cannot sit in a nested compile region, so each decoder layer is its own compiled call. Plain and speculative
    (two-token recorded verification steps) greedy decoding give the eager tokens."""
    for module in (gated_deltanet, decoding):
        monkeypatch.setattr(module, "traces_recurrent_step", lambda device: False)
    torch.manual_seed(0)
    config = dataclasses.replace(TINY_CONFIGS["dense_untied_gqa2_hv2x"], mtp_num_hidden_layers=1)
    model = qwen35.Qwen35ForCausalLM(config).eval()
    ids = _ids(config, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    expected = qwen35.generate(model, ids, 10, padding_mask=mask, eos_token_id=[], compile=False)
    for speculative in (None, "mtp"):
        got = qwen35.generate(model, ids, 10, padding_mask=mask, eos_token_id=[], compile=True,
                              speculative=speculative)
        assert torch.equal(got, expected), speculative


def test_decode_steps_are_compiled_where_the_compile_pays_and_can_compile():
    dense = qwen35.Qwen35ForCausalLM(TINY_CONFIGS["dense_untied_gqa2_hv2x"])
    assert compile_pays(dense, "cuda", 1) and compile_pays(dense, "cpu", CPU_COMPILE_MIN_STEPS)
    assert not compile_pays(dense, "cpu", CPU_COMPILE_MIN_STEPS - 1)
    moe = qwen35.Qwen35ForCausalLM(TINY_CONFIGS["moe_untied"])
    assert not compile_pays(moe, "cuda", 1) and compile_pays(moe.to(torch.bfloat16), "cuda", 1)
    with pytest.raises(ValueError, match="compile=True: an MoE model in torch.float32 cannot be compiled"):
        qwen35.generate(moe.float(), _ids(moe.config, (1, 4)), 2, compile=True)
