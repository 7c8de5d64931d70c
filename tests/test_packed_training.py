"""Packed rows and the chunked loss against their dense references: per-document attention (the CPU per-document
op, and flex_attention's block mask in the forward) vs the dense [T, T] mask; the chunked linear + cross entropy
vs full logits + torchtitan's cross entropy; both together under TP = 2 (gloo) and in a debug.toml training run."""

import pytest
import torch
import torch.nn.functional as F

import qwen35
from distributed_utils import run_distributed
from parallelism import ParallelDims, ParallelizeSettings, parallelize
from qwen35.linear_cross_entropy import linear_cross_entropy
from test_train_helpers import debug_args, scalars, run_instrumented
from tiny_configs import TINY_CONFIGS
from torchtitan_ext.loss import Qwen35Loss
from torchtitan_ext.model_spec import model_registry
from torchtitan_ext.train import load_config

DOCUMENT_LENGTHS = [1, 63, 64, 65, 700, 3]  # around flex's 128-token blocks; 896 tokens (even, for TP = 2)
CU_SEQLENS = torch.tensor([0, *torch.tensor(DOCUMENT_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
SEQ_LEN = int(CU_SEQLENS[-1])


def _ids_and_labels(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (1, SEQ_LEN), generator=g)
    labels = torch.randint(0, vocab_size, (1, SEQ_LEN), generator=g)
    labels[0, ::5] = -100  # a loss mask
    return ids, labels


def _logits_and_grads(model, ids, labels, packed_attention: str):
    """Logits and the gradients of the mean next-token loss."""
    model.packed_attention = packed_attention
    model.zero_grad(set_to_none=True)
    logits = model(ids, cu_seqlens=CU_SEQLENS)
    F.cross_entropy(logits[0], labels[0]).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("config_name", ["dense_untied_gqa2_hv2x", "dense_tied_gqa4_hv1x"])
def test_per_document_attention_matches_dense_mask(config_name):
    """GQA 2 and 4, partial RoPE, the output gate: fp32 logits and every gradient within 1e-5."""
    config = TINY_CONFIGS[config_name]
    assert config.rotary_dim < config.head_dim
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(config)
    ids, labels = _ids_and_labels(config.vocab_size)
    logits, grads = _logits_and_grads(model, ids, labels, "per_document")
    expected, expected_grads = _logits_and_grads(model, ids, labels, "dense")
    assert (logits - expected).abs().max().item() <= 1e-5
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max().item() <= 1e-5, name
    assert grads["model.layers.3.self_attn.q_proj.weight"].abs().max() > 1e-3  # the attention layer is exercised


def test_per_document_attention_op_passes_opcheck():
    """Schema, fake kernel and autograd registration of the CPU op (a compiled packed forward runs through it:
    tests/test_compile.py), on documents of 1 to 71 tokens."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g) for _ in range(3))
    cu_seqlens = torch.tensor([0, 1, 64, 129, 200], dtype=torch.int32)
    torch.library.opcheck(torch.ops.qwen35.per_document_attention.default, (q, k, v, cu_seqlens, 0.25))


def test_flex_block_mask_forward_matches_dense_mask_without_graph_breaks():
    """The CUDA path's block mask, run by the CPU flex kernel (forward only: flex has no CPU backward), on the
    documents of 1, 63, 64, 65 and 700 tokens: 893 tokens, the last 128-token block partial."""
    config = TINY_CONFIGS["dense_untied_gqa2_hv2x"]
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(config)
    cu_seqlens = CU_SEQLENS[:-1]
    ids = _ids_and_labels(config.vocab_size)[0][:, :int(cu_seqlens[-1])]
    with torch.no_grad():
        model.packed_attention = "flex"
        explanation = torch._dynamo.explain(model)(ids, cu_seqlens=cu_seqlens)
        logits = model(ids, cu_seqlens=cu_seqlens)
        model.packed_attention = "dense"
        expected = model(ids, cu_seqlens=cu_seqlens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert (logits - expected).abs().max().item() <= 1e-5


def _training_model(tie: bool):
    torch.manual_seed(0)
    config = qwen35.Qwen35Config.from_flavor("debug", tie_word_embeddings=tie)
    return model_registry("debug", architecture=config).model.build()


def _loss_and_grads(model, ids, labels, *, chunk_size, packed_attention) -> tuple[float, dict]:
    """The trainer's loss (training mode, summed over valid tokens / 100) and every parameter's full gradient."""
    model.train()
    model.packed_attention = packed_attention
    model.zero_grad(set_to_none=True)
    loss, _ = Qwen35Loss.Config(chunk_size=chunk_size).build()(model(ids, cu_seqlens=CU_SEQLENS), labels,
                                                              torch.tensor(100))
    loss.backward()
    full = lambda t: t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t  # noqa: E731
    return full(loss).item(), {name: full(p.grad) for name, p in model.named_parameters()}


def _reference_loss_and_grads(tie: bool):
    model = _training_model(tie)
    ids, labels = _ids_and_labels(model.config.vocab_size)
    return _loss_and_grads(model, ids, labels, chunk_size=None, packed_attention="dense")


def _assert_matches_reference(result, reference):
    (loss, grads), (expected, expected_grads) = result, reference
    assert abs(loss - expected) <= 1e-6 * expected
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_trainer_loss_chunked_packed_matches_full_logits_dense_mask(tie):
    """Qwen35Loss on the model's TrainingOutput, blocks of 100 tokens, per-document attention, vs full logits and
    the dense mask: the loss within 1e-6 relative, the gradients of every weight (lm_head, the tied embedding, the
    attention) within 1e-5."""
    model = _training_model(tie)
    ids, labels = _ids_and_labels(model.config.vocab_size)
    result = _loss_and_grads(model, ids, labels, chunk_size=100, packed_attention="per_document")
    _assert_matches_reference(result, _reference_loss_and_grads(tie))


def _tensor_parallel_loss_and_grads(tie: bool):
    dims = ParallelDims(world_size=2, tp=2)
    model = _training_model(tie)
    parallelize(model, dims, dims.build_meshes("cpu"), ParallelizeSettings(loss_parallel=True))
    ids, labels = _ids_and_labels(model.config.vocab_size)
    out = model(ids, cu_seqlens=CU_SEQLENS)
    assert out.lm_head_weight.placements == (torch.distributed.tensor.Shard(0),)
    return _loss_and_grads(model, ids, labels, chunk_size=100, packed_attention="per_document")


def test_two_process_tensor_parallel_chunked_loss_and_packed_attention_match_one_process():
    """TP = 2 (heads sharded, vocab-sharded chunked loss), tied embeddings, a loss mask."""
    _assert_matches_reference(run_distributed(_tensor_parallel_loss_and_grads, True),
                              _reference_loss_and_grads(True))


def test_debug_training_run_matches_dense_mask_and_full_logits(tmp_path, monkeypatch):
    """train_configs/debug.toml (packed rows), 5 steps: the default path (per-document attention, chunked loss)
    logs the losses of the previous one (dense mask, full logits) within 1e-5 relative."""
    losses = {}
    for name, packed_attention, chunk_size in (("new", "auto", 1024), ("previous", "dense", None)):
        monkeypatch.setattr(qwen35.Qwen35ForCausalLM, "packed_attention", packed_attention)
        config = load_config(debug_args(tmp_path / name, "--training.steps", "5",
                                        "--lr_scheduler.warmup_steps", "2"))
        assert config.loss.chunk_size == 1024  # the default
        config.loss.chunk_size = chunk_size
        run_instrumented(config)
        losses[name] = scalars(tmp_path / name)["loss_metrics/global_avg_loss"]
    assert sorted(losses["new"]) == list(range(1, 6))
    for step, expected in losses["previous"].items():
        assert abs(losses["new"][step] - expected) <= 1e-5 * expected, (step, losses)
    assert len(set(losses["new"].values())) == 5
