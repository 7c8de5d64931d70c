"""Context parallelism (parallelism.context_parallel) on 2 and 4 gloo processes against one process: the delta rule
across ranks against the float64 sequential recurrence (values and gradients of every input), the causal conv with
its halo, and the whole model (logits and every parameter gradient), over packed documents that start exactly at a
chunk boundary, one token before one, cross one or several boundaries, and one document spanning all ranks; at
C = 2 also the model's forward with the flex attention path, and the model with every block compiled. One rank's
attention alone against dense attention, and the trainer's config rules for context parallelism."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from delta_rule_oracle import naive_gated_delta_rule_f64
from distributed_utils import run_distributed
from parallelism.compile import apply_compile
from parallelism.context_parallel import (ContextParallel, apply_context_parallel, attention_tiles, chunks_of_rank,
                                          gathered_chunk_slot, gathered_keys_block_mask, gathered_positions,
                                          rank_positions, tiled_attention)
from qwen35 import Qwen35ForCausalLM
from qwen35.attention import packed_document_attention
from qwen35.model import packed_document_ids_and_positions, packed_positions_and_mask
from test_train_helpers import debug_args
from tiny_configs import tiny
from torchtitan_ext.toml_config import ConfigError
from torchtitan_ext.train import load_config

KERNEL_SEQ_LEN = 64
# Boundaries per degree (each rank holds chunks r and 2C - 1 - r of T / 2C tokens): C = 2 (chunks of 16) has a
# document starting one token before the chunk boundary 32 and crossing it, and ones crossing 16 and 48; C = 4
# (chunks of 8) adds one ending exactly at a chunk boundary (16), one starting there and one spanning four chunks.
PACKED = {2: [0, 5, 31, 40, 64], 4: [0, 5, 16, 31, 40, 64]}
# The model cases: (dtype, T, document boundaries). fp32 at T = 1024 (chunks of 256 at C = 2, 128 at C = 4): one
# document ending exactly at the chunk boundary 256, one starting there, one starting one token before the boundary
# 512 and crossing it, one crossing 768. float64 at T = 128: the same layout scaled down, and one document spanning
# all ranks.
MODEL_CASES = {
    "fp32_packed": (torch.float32, 1024, [0, 37, 255, 256, 511, 700, 1024]),
    "fp64_packed": (torch.float64, 128, [0, 5, 31, 32, 63, 90, 128]),
    "fp64_spanning": (torch.float64, 128, [0, 128]),
}


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def _delta_rule_errors(cp: ContextParallel, cu_seqlens: list[int]) -> dict[str, float]:
    """Max |CP - float64 recurrence| of this rank's outputs and of the gradients of its inputs."""
    gen = torch.Generator().manual_seed(0)
    T, H, HV, K, V = KERNEL_SEQ_LEN, 2, 4, 8, 6
    q, k = (torch.randn(1, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, T, HV, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(1, T, HV, generator=gen, dtype=torch.float64)) * 0.5
    beta = torch.rand(1, T, HV, generator=gen, dtype=torch.float64)
    weight = torch.randn(1, T, HV, V, generator=gen, dtype=torch.float64)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)

    full = [_leaf(x) for x in (q, k, v, g, beta)]
    o_ref, _ = naive_gated_delta_rule_f64(*full, cu_seqlens=cu, use_qk_l2norm=True)
    (o_ref * weight).sum().backward()

    shard = cp.shard(cu, T)
    local = [_leaf(shard.take(x)) for x in (q, k, v, g, beta)]
    o, _ = cp.chunk_gated_delta_rule(*local, cu_seqlens=shard.cu_seqlens, use_qk_l2norm=True)
    (o * shard.take(weight)).sum().backward()
    errors = {"o": _max_error(o, shard.take(o_ref))}
    for name, x_local, x_full in zip(("q", "k", "v", "g", "beta"), local, full):
        errors[f"d{name}"] = _max_error(x_local.grad, shard.take(x_full.grad))
    return errors


def _conv_errors(cp: ContextParallel, cu_seqlens: list[int]) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    T, C, W = KERNEL_SEQ_LEN, 5, 4
    x = torch.randn(1, T, C, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, W, generator=gen, dtype=torch.float64)
    out_weight = torch.randn(1, T, C, generator=gen, dtype=torch.float64)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    x_full = _leaf(x)
    y_ref, _ = kernels.causal_conv1d(x_full, weight, cu_seqlens=cu)
    (y_ref * out_weight).sum().backward()
    shard = cp.shard(cu, T)
    x_local = _leaf(shard.take(x))
    y, _ = cp.causal_conv1d(x_local, weight, cu_seqlens=shard.cu_seqlens)
    (y * shard.take(out_weight)).sum().backward()
    return {"y": _max_error(y, shard.take(y_ref)), "dx": _max_error(x_local.grad, shard.take(x_full.grad))}


def _worst_over_ranks(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each error's maximum over the ranks (run_distributed returns rank 0's value only)."""
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, results)
    return {case: {name: max(r[case][name] for r in every_rank) for name in errors}
            for case, errors in results.items()}


def _bad_batches_raise(cp: ContextParallel) -> None:
    with pytest.raises(ValueError, match="packed_attention = 'dense'; expected 'auto', 'flex' or 'per_document'"):
        ContextParallel(cp.group, "dense")
    for cu_seqlens, seq_len, message in (([0, 49], 49, "must be divisible by 2 x the context-parallel degree"),
                                         ([0, 30, 20, 48], 48, "must rise strictly from 0 to the sequence length"),
                                         ([0, 40], 48, "must rise strictly from 0 to the sequence length 48"),
                                         ([0, 4 * cp.size], 4 * cp.size, "must cover a conv window")):
        with pytest.raises(ValueError, match=message):
            cp.shard(torch.tensor(cu_seqlens, dtype=torch.int32), seq_len)
    shard = cp.shard(torch.tensor([0, 64], dtype=torch.int32), 64)
    x = torch.zeros(1, 2 * shard.chunk, 5)
    with pytest.raises(ValueError, match="with cu_seqlens=shard.cu_seqlens of the current"):
        cp.causal_conv1d(x, torch.zeros(5, 4), cu_seqlens=shard.cu_seqlens.clone())
    with pytest.raises(ValueError, match="does not carry caller states"):
        cp.causal_conv1d(x, torch.zeros(5, 4), cu_seqlens=shard.cu_seqlens, output_final_state=True)


def _kernel_checks() -> dict[str, dict[str, float]]:
    cp = ContextParallel(dist.group.WORLD)
    _bad_batches_raise(cp)
    results = {}
    for case, cu_seqlens in (("packed", PACKED[cp.size]), ("spanning", [0, KERNEL_SEQ_LEN])):
        results[f"delta_rule_{case}"] = _delta_rule_errors(cp, cu_seqlens)
        results[f"conv_{case}"] = _conv_errors(cp, cu_seqlens)
    return results


def _model_errors(dtype: torch.dtype, seq_len: int, cu_seqlens: list[int]) -> dict[str, float]:
    """The tiny dense model (3 GDN layers, 1 attention layer): max |CP - one process| of this rank's logits, and of
    each parameter gradient (summed over the ranks) relative to the largest gradient entry of the whole model. (Per
    tensor relative errors are fp32 noise where a gradient cancels to ~1e-8: one process's own fp32 gradients differ
    from float64 by 17% there. The float64 cases bound them per tensor; their norms and log-decays still compute
    in fp32, so they are not exact to float64 rounding either.)"""
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(tiny()).to(dtype)
    cp_model = copy.deepcopy(model)
    cp = apply_context_parallel(cp_model, dist.group.WORLD)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
    labels = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)

    logits_ref = model(ids, cu_seqlens=cu)
    (F.cross_entropy(logits_ref[0], labels[0], reduction="sum") / seq_len).backward()

    shard = cp.shard(cu, seq_len)
    logits = cp_model(shard.take(ids), position_ids=shard.position_ids, cu_seqlens=shard.cu_seqlens)
    (F.cross_entropy(logits[0], shard.take(labels)[0], reduction="sum") / seq_len).backward()
    errors = {"logits": _max_error(logits, shard.take(logits_ref))}
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p_ref), p in zip(model.named_parameters(), cp_model.parameters()):
        dist.all_reduce(p.grad)  # each rank holds its tokens' share of every parameter gradient
        reference_scale = scale if dtype == torch.float32 else p_ref.grad.abs().max().item()
        errors[name] = _max_error(p.grad, p_ref.grad) / reference_scale
    return errors


# Packings of a 256-token row, one per step of the compiled model: the document count changes every step.
COMPILED_PACKINGS = ([0, 37, 100, 256], [0, 64, 127, 200, 256], [0, 256], [0, 5, 60, 61, 190, 256])


def _compiled_model_errors() -> dict[str, float]:
    """The tiny model under context parallelism with every block compiled (fullgraph: no graph break, the
    all-gathers and their reduce-scatters inside the graphs; aot_eager, which traces forward and backward as
    inductor gets them), over packings that change every step: max |CP compiled - one process eager| of the logits
    and of every parameter gradient (relative to the largest entry) over the steps, and the graphs compiled."""
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(tiny())
    cp_model = copy.deepcopy(model)
    cp = apply_context_parallel(cp_model, dist.group.WORLD)
    apply_compile(cp_model, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(3)
    errors = {"logits": 0.0, "grads": 0.0}
    for cu_seqlens in COMPILED_PACKINGS:
        seq_len = cu_seqlens[-1]
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
        cu = torch.tensor(cu_seqlens, dtype=torch.int32)
        model.zero_grad(set_to_none=True)
        cp_model.zero_grad(set_to_none=True)
        logits_ref = model(ids, cu_seqlens=cu)
        (logits_ref.square().sum() / logits_ref.numel()).backward()
        shard = cp.shard(cu, seq_len)
        logits = cp_model(shard.take(ids), position_ids=shard.position_ids, cu_seqlens=shard.cu_seqlens)
        (logits.square().sum() / logits_ref.numel()).backward()
        errors["logits"] = max(errors["logits"], _max_error(logits, shard.take(logits_ref)))
        scale = max(p.grad.abs().max().item() for p in model.parameters())
        for p_ref, p in zip(model.parameters(), cp_model.parameters()):
            dist.all_reduce(p.grad)
            errors["grads"] = max(errors["grads"], _max_error(p.grad, p_ref.grad) / scale)
    errors["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return errors


def _flex_model_forward_errors() -> dict[str, float]:
    """The CUDA path's attention (flex_attention with the gathered-keys block mask, chosen by the model's
    packed_attention = "flex"), forward only (flex has no CPU backward): max |CP - one process| of the logits,
    eager on the fp32 packed case, then with every block compiled (fullgraph, aot_eager) on it and on a packing with
    another document count."""
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(tiny())
    cp_model = copy.deepcopy(model)
    cp_model.packed_attention = "flex"
    cp = apply_context_parallel(cp_model, dist.group.WORLD)
    _, seq_len, packed = MODEL_CASES["fp32_packed"]
    gen = torch.Generator().manual_seed(2)
    errors = {}
    for case, cu_seqlens in (("eager", packed), ("compiled", packed), ("compiled_repacked", [0, 300, 900, 1024])):
        if case == "compiled":
            apply_compile(cp_model, backend="aot_eager")
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
        cu = torch.tensor(cu_seqlens, dtype=torch.int32)
        shard = cp.shard(cu, seq_len)
        assert shard.attention_block_mask is not None and shard.attention_tiles is None
        with torch.no_grad():
            logits_ref = model(ids, cu_seqlens=cu)
            logits = cp_model(shard.take(ids), position_ids=shard.position_ids, cu_seqlens=shard.cu_seqlens)
        errors[case] = _max_error(logits, shard.take(logits_ref))
    return errors


def _all_checks(two_ranks: bool) -> dict[str, dict[str, float]]:
    """One process group for every check (starting processes is most of the cost on two cores)."""
    results = _kernel_checks()
    results.update({f"model_{case}": _model_errors(*args) for case, args in MODEL_CASES.items()})
    if two_ranks:
        results["model_flex_forward"] = _flex_model_forward_errors()
        results["compiled"] = _compiled_model_errors()
    return _worst_over_ranks(results)


@pytest.mark.parametrize("world_size", [2, 4])
def test_context_parallel_matches_one_process(world_size):
    """Kernels (float64 throughout) to 1e-10 absolute; the model to 1e-5 (see _model_errors); at C = 2 also the
    flex attention path's forward and the compiled model, with at most 4 graphs for 4 packings (the GDN and the
    attention block, each once with the first document count and once with a dynamic one: Dynamo's automatic
    dynamic shapes; no recompile after)."""
    results = run_distributed(_all_checks, world_size == 2, world_size=world_size)
    if world_size == 2:
        assert 2 <= results["compiled"].pop("graphs") <= 4
    for case, errors in results.items():
        tolerance = 1e-5 if case.startswith(("model_", "compiled")) else 1e-10
        for name, error in errors.items():
            assert error < tolerance, (case, name, error)


# The attention of one rank alone (no process group): its queries against every rank's keys in all-gather order,
# against dense block-causal attention of its queries over the whole row. Rank 0 of C = 2 holds chunks 0 and 3 of
# 200 tokens: flex's 128-token blocks straddle chunks and documents, the last query and key blocks are partial
# (16 and 32 tokens), and the query block 656-783 is in the document 300-800 with key blocks wholly before it
# (312-439, 440-567: full blocks, no mask_mod).
ATTENTION_BOUNDS = [0, 37, 95, 96, 300, 800]


def _one_rank_attention(dtype, rank=0, size=2, seq_len=800, heads=4, kv_heads=2, head_dim=16):
    """Leaves (this rank's queries, the gathered keys, the gathered values), leaves (the same queries, the row's
    keys and values) with the dense reference output computed from the latter, the gathered keys' global
    positions and the chunk length."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, heads, seq_len, head_dim, generator=gen, dtype=dtype)
    k, v = (torch.randn(1, kv_heads, seq_len, head_dim, generator=gen, dtype=dtype) for _ in range(2))
    chunk = seq_len // (2 * size)
    local, gathered = rank_positions(rank, size, chunk), gathered_positions(size, chunk)
    _, mask = packed_positions_and_mask(torch.tensor(ATTENTION_BOUNDS, dtype=torch.int32), seq_len)
    row = [_leaf(q[:, :, local]), _leaf(k), _leaf(v)]
    reference = F.scaled_dot_product_attention(*row, attn_mask=mask[:, :, local], enable_gqa=True)
    parts = [_leaf(q[:, :, local]), _leaf(k[:, :, gathered]), _leaf(v[:, :, gathered])]
    return parts, row, reference, gathered, chunk


def test_tiled_attention_of_one_rank_matches_dense_attention_float64():
    """The CPU path (flash tiles merged by log-sum-exp): output and gradients of q, k, v to 1e-12."""
    (q, k, v), row, reference, gathered, chunk = _one_rank_attention(torch.float64)
    tiles = torch.tensor(attention_tiles(ATTENTION_BOUNDS, chunks_of_rank(0, 2), chunk,
                                         lambda c: gathered_chunk_slot(c, 2)))
    out, _ = tiled_attention(q, k, v, tiles, q.shape[-1] ** -0.5)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * weight).sum().backward()
    (reference * weight).sum().backward()
    assert _max_error(out, reference) < 1e-12
    assert _max_error(q.grad, row[0].grad) < 1e-12
    assert _max_error(k.grad, row[1].grad[:, :, gathered]) < 1e-12
    assert _max_error(v.grad, row[2].grad[:, :, gathered]) < 1e-12


def test_flex_block_mask_of_one_rank_matches_dense_attention():
    """The non-CPU path's block mask (flex_attention forward on CPU; its backward is CUDA-only) to 1e-5 in fp32."""
    (q, k, v), _, reference, _, chunk = _one_rank_attention(torch.float32)
    doc, _ = packed_document_ids_and_positions(torch.tensor(ATTENTION_BOUNDS, dtype=torch.int32), k.shape[2])
    block_mask = gathered_keys_block_mask(doc, 0, 2, chunk)
    assert block_mask.full_kv_num_blocks.sum() > 0 and block_mask.kv_num_blocks.sum() > 0
    out = packed_document_attention(q.detach(), k.detach(), v.detach(), block_mask)
    assert _max_error(out, reference) < 1e-5


@pytest.mark.parametrize("overrides, message", [
    (["--training.seq_len", "250"], r"\[training\] seq_len = 250: must be a multiple of 2 x \[parallelism\] "
                                    r"context_parallel_degree = 4 and at least 28"),
    (["--training.seq_len", "24"], r"\[training\] seq_len = 24: must be a multiple of 2 x"),
    (["--model.mtp_loss_weight", "0.3"], r"\[model\] mtp_loss_weight = 0.3: the MTP head does not compose with "
                                         r"\[parallelism\] context_parallel_degree = 2"),
])
def test_trainer_config_rules_for_context_parallelism(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=message):
        load_config(debug_args(tmp_path, "--parallelism.context_parallel_degree", "2", *overrides))
