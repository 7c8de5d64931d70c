"""torch.compile(fullgraph=True) of a GDN layer, decoder blocks and a packed forward: zero graph breaks, results
equal to eager, dynamic sequence lengths sharing one graph, and packings changing every step without recompiling
every step."""

import pytest
import torch

import qwen35
from qwen35.attention import PackedDocuments, document_block_mask
from qwen35.gated_deltanet import GatedDeltaNet
from qwen35.model import DecoderLayer
from tiny_configs import TINY_CONFIGS

CONFIG = TINY_CONFIGS["dense_untied_gqa2_hv2x"]


def _assert_one_graph(fn, *args, **kwargs):
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _fwd_bwd(fn, module, *args, **kwargs):
    """Output and parameter gradients of `fn` (the module itself or its compiled wrapper)."""
    module.zero_grad(set_to_none=True)
    out = fn(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_fwd_bwd(eager_module, compiled, *args, atol=1e-5, **kwargs):
    out_e, grads_e = _fwd_bwd(eager_module, eager_module, *args, **kwargs)
    out_c, grads_c = _fwd_bwd(compiled, eager_module, *args, **kwargs)
    assert grads_e.keys() == grads_c.keys() and grads_e
    torch.testing.assert_close(out_c, out_e, atol=atol, rtol=10 * atol)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=atol, rtol=10 * atol, msg=lambda m: f"{name}: {m}")


def test_gated_deltanet_layer_inductor_fullgraph():
    torch.manual_seed(0)
    layer = GatedDeltaNet(CONFIG)
    x = torch.randn(2, 70, CONFIG.hidden_size)
    _assert_one_graph(layer, x)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    _assert_same_fwd_bwd(layer, compiled, x)


# torch._grouped_mm's fake kernel only accepts bf16, so the MoE block compiles in bf16 (as it trains on GPU).
@pytest.mark.parametrize("config_name, dtype, tol", [("dense_untied_gqa2_hv2x", torch.float32, 1e-5),
                                                     ("moe_untied", torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layer_idx", [0, 3])  # Gated DeltaNet block, full-attention block
def test_decoder_block_fullgraph(config_name, dtype, tol, layer_idx):
    config = TINY_CONFIGS[config_name]
    torch.manual_seed(0)
    block = DecoderLayer(config, layer_idx).to(dtype)
    x = torch.randn(2, 40, config.hidden_size, dtype=dtype)
    cos, sin = qwen35.model.RotaryEmbedding(config.rotary_dim, config.rope_theta)(
        torch.arange(40)[None].expand(2, 40), x.dtype)
    _assert_one_graph(block, x, cos, sin)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    _assert_same_fwd_bwd(block, compiled, x, cos, sin, atol=tol)


def test_packed_model_forward_fullgraph():
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(CONFIG)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 90))
    cu_seqlens = torch.tensor([0, 31, 32, 77, 90], dtype=torch.int32)
    _assert_one_graph(model, ids, cu_seqlens=cu_seqlens)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same_fwd_bwd(model, compiled, ids, cu_seqlens=cu_seqlens)


def _compile_counting_graphs(module) -> tuple[torch.nn.Module, list]:
    """`module` compiled (fullgraph) by a backend that records each graph and runs it as it is."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(module, fullgraph=True, backend=counting_backend), graphs


def test_dynamic_sequence_lengths_share_one_graph():
    torch.manual_seed(0)
    block = DecoderLayer(CONFIG, 0)
    compiled, graphs = _compile_counting_graphs(block)
    rope = qwen35.model.RotaryEmbedding(CONFIG.rotary_dim, CONFIG.rope_theta)
    for seq in (70, 100, 33):
        x = torch.randn(1, seq, CONFIG.hidden_size)
        cos, sin = rope(torch.arange(seq)[None], x.dtype)
        for t in (x, cos, sin):
            torch._dynamo.mark_dynamic(t, 1)
        expected, _ = block(x, cos, sin)
        got, _ = compiled(x, cos, sin)
        assert (got - expected).abs().max().item() <= 1e-5
    assert len(graphs) == 1


# Gated DeltaNet block: a row holding a single document gets its own graph (the delta-rule op specialises on it).
# "flex" (the CUDA path's block mask) runs forward only: flex_attention has no CPU backward.
@pytest.mark.parametrize("layer_idx, documents, graph_count", [(0, "per_document", 3), (3, "per_document", 2),
                                                              (3, "flex", 1)],
                         ids=["gated_deltanet", "attention", "attention_flex"])
def test_packing_changing_every_step_compiles_at_most_three_times_in_100_steps(layer_idx, documents, graph_count):
    """A compiled block sees a new packing (document count and boundaries) at every step: one graph for the first
    packing and one with a dynamic document count (Dynamo's automatic dynamic shapes), then no recompiles. The
    flex block mask's shapes depend on the row length only: one graph."""
    torch.manual_seed(0)
    block = DecoderLayer(CONFIG, layer_idx)
    compiled, graphs = _compile_counting_graphs(block)
    rope = qwen35.model.RotaryEmbedding(CONFIG.rotary_dim, CONFIG.rope_theta)
    seq_len, g = 64, torch.Generator().manual_seed(0)
    x = torch.randn(1, seq_len, CONFIG.hidden_size)
    with torch.set_grad_enabled(documents != "flex"):
        for _ in range(100):
            num_docs = int(torch.randint(1, 8, (), generator=g))
            cuts = torch.randperm(seq_len - 1, generator=g)[:num_docs - 1].add(1).sort().values
            cu_seqlens = torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])]).to(torch.int32)
            doc, positions = qwen35.model.packed_document_ids_and_positions(cu_seqlens, seq_len)
            cos, sin = rope(positions, x.dtype)
            mask = document_block_mask(doc) if documents == "flex" else PackedDocuments(cu_seqlens)
            got, _ = compiled(x, cos, sin, attn_mask=mask, cu_seqlens=cu_seqlens)
        expected, _ = block(x, cos, sin, attn_mask=mask, cu_seqlens=cu_seqlens)
    assert (got - expected).abs().max().item() <= 1e-5
    assert len(graphs) == graph_count
