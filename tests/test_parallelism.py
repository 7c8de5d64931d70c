"""Distributed training on CPU (gloo, 2 processes): FSDP, TP/SP, EP and TP + compile reproduce the 1-process
losses of the first 3 AdamW steps; float8 conversion (torchao emulation) trains; impossible degrees are
rejected with the offending key.

TP + compile runs inductor (the GPU default) on a packed batch whose `cu_seqlens` changes length every step,
as the trainer's packed data does: the second step recompiles the blocks with a dynamic document count (the
case that used to fail, see parallelism/tensor_parallel.py)."""

import contextlib
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

import qwen35
from distributed_utils import run_distributed
from parallelism import ParallelDims, ParallelizeSettings, parallelize
from parallelism.float8 import float8_module_filter

STEPS, GLOBAL_BATCH, SEQ_LEN = 3, 2, 64
# Document boundaries of the packed row [1, GLOBAL_BATCH * SEQ_LEN], one per step: 2, 3 then 4 documents.
PACKED_CU_SEQLENS = ([0, 50, 128], [0, 20, 70, 128], [0, 30, 60, 100, 128])


def _batch(config) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _model(flavor: str, **overrides) -> qwen35.Qwen35ForCausalLM:
    torch.manual_seed(0)
    return qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config.from_flavor(flavor, **overrides))


def _train(model, ids: torch.Tensor, dp_mesh=None, packed: bool = False) -> list[float]:
    """Mean next-token loss of each step; with data parallelism (`dp_mesh`), averaged over the data-parallel ranks
    (not over all ranks: tensor-parallel ranks share their data).
    packed: `ids` is one packed row and step i passes PACKED_CU_SEQLENS[i]."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        if packed:
            logits = model(ids, cu_seqlens=torch.tensor(PACKED_CU_SEQLENS[step], dtype=torch.int32))
        else:
            logits = model(ids)
        vocab_sharded = isinstance(logits, DTensor)  # loss_parallel: torch's vocab-parallel cross entropy
        if vocab_sharded:
            assert logits.placements == (Shard(2),) and logits.to_local().shape[-1] * 2 == logits.shape[-1]
        with loss_parallel() if vocab_sharded else contextlib.nullcontext():
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reported = (loss.full_tensor() if vocab_sharded else loss).detach().clone()
        if dp_mesh is not None and dp_mesh.size() > 1:
            dist.all_reduce(reported, group=dp_mesh.get_group())
            reported /= dp_mesh.size()
        losses.append(reported.item())
    return losses


def _packed_batch(config) -> torch.Tensor:
    ids = _batch(config).reshape(1, -1)
    assert ids.shape[1] == PACKED_CU_SEQLENS[0][-1]
    return ids


def _train_distributed(flavor: str, overrides: dict, degrees: dict, options: dict,
                       packed: bool = False) -> list[float]:
    dims = ParallelDims(world_size=dist.get_world_size(), **degrees)
    meshes = dims.build_meshes("cpu")
    model = _model(flavor, **overrides)
    settings = ParallelizeSettings(**options)
    parallelize(model, dims, meshes, settings)
    # the blocks and the embedding (norm + lm_head are never resharded, see parallelism/fsdp.py; FSDP decides the root)
    for unit in [*model.model.layers, model.model.embed_tokens] if dims.fsdp_enabled else []:
        group = unit._get_fsdp_state()._fsdp_param_group
        assert (group.post_forward_mesh_info is not None) == settings.fsdp_reshard_after_forward
        assert isinstance(group.offload_policy, CPUOffloadPolicy) == settings.fsdp_cpu_offload
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for layer in model.decoder_layers() if model.config.is_moe else []:  # the MTP head's MoE layer too
        assert layer.mlp.experts.num_experts * dims.ep == model.config.num_experts
    if packed:  # one row: every rank holds all of it (tensor parallelism only)
        assert dims.dp == 1, degrees
        return _train(model, _packed_batch(model.config), packed=True)
    dp_rank, per_rank = meshes.dp.get_local_rank(), GLOBAL_BATCH // dims.dp
    ids = _batch(model.config)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return _train(model, ids, meshes.dp)


_REFERENCE: dict[tuple, list[float]] = {}


def _reference_losses(flavor: str, packed: bool = False, **overrides) -> list[float]:
    """1 process, eager."""
    key = (flavor, packed, *sorted(overrides.items()))
    if key not in _REFERENCE:
        model = _model(flavor, **overrides)
        if packed:
            _REFERENCE[key] = _train(model, _packed_batch(model.config), packed=True)
        else:
            _REFERENCE[key] = _train(model, _batch(model.config))
    return _REFERENCE[key]


TIED = dict(tie_word_embeddings=True)


@pytest.mark.parametrize("flavor, overrides, degrees, options", [
    pytest.param("debug", {}, dict(dp_shard=2), dict(activation_checkpoint="full"), id="fsdp2-full_ac"),
    pytest.param("debug", {}, dict(tp=2), dict(activation_checkpoint="selective"), id="tp2-selective_ac"),
    pytest.param("debug", {}, dict(dp_shard=2), dict(fsdp_reshard_after_forward=False, fsdp_cpu_offload=True),
                 id="fsdp2-no_reshard-cpu_offload"),
    pytest.param("debug", TIED, dict(tp=2), dict(loss_parallel=True), id="tp2-tied_embeddings-loss_parallel"),
    # with an MTP head (unused by this loss): its MoE layer's experts are split over the EP ranks like the blocks'
    pytest.param("debug-moe", dict(mtp_num_hidden_layers=1), dict(dp_shard=2, ep=2), {}, id="ep2-moe-mtp_head"),
    # Selective AC around FSDP-sharded experts (parallelism/activation_checkpoint.py), and compile around the
    # experts, whose token exchange has data-dependent split sizes (parallelism/compile.py).
    pytest.param("debug-moe", {}, dict(dp_shard=2, ep=2), dict(activation_checkpoint="selective"),
                 id="ep2-moe-selective_ac"),
    pytest.param("debug-moe", {}, dict(dp_shard=2, ep=2), dict(activation_checkpoint="selective", compile=True),
                 id="ep2-moe-compile"),
    pytest.param("debug-moe", {}, dict(tp=2), {}, id="tp2-moe"),
])
def test_two_process_losses_match_one_process(flavor, overrides, degrees, options):
    losses = run_distributed(_train_distributed, flavor, overrides, degrees, options)
    torch.testing.assert_close(losses, _reference_losses(flavor, **overrides), rtol=1e-5, atol=0)


def test_two_process_tensor_parallel_inductor_packed_batches_match_one_process():
    """TP=2 + per-block inductor compile, cu_seqlens of a different length at every step."""
    losses = run_distributed(_train_distributed, "debug", {}, dict(tp=2),
                             dict(compile=True, compile_backend="inductor"), True)
    expected = _reference_losses("debug", packed=True)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    assert len(set(losses)) == STEPS


def test_two_process_tensor_parallel_float8_trains():
    losses = run_distributed(_train_distributed, "debug", {}, dict(tp=2), dict(float8=True, float8_emulate=True))
    torch.testing.assert_close(losses, _reference_losses("debug"), rtol=0.05, atol=0)


BF16_MIXED_PRECISION = ParallelizeSettings(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))


def test_mixed_precision_without_fsdp_is_torch_autocast():
    """One process (no FSDP to cast parameters): the forward runs under torch.autocast(bf16), bit for bit, with fp32
    parameters and gradients, and leaves autocast off; parameters already in bf16 get no autocast."""
    model = _model("debug")
    record = parallelize(model, ParallelDims(world_size=1), None, BF16_MIXED_PRECISION)
    assert record.autocast == torch.bfloat16 and str(record) == "autocast(bfloat16)"
    reference = _model("debug")
    ids = _batch(model.config)
    logits = model(ids)
    assert logits.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    logits.float().logsumexp(-1).mean().backward()
    expected.float().logsumexp(-1).mean().backward()
    for (name, param), reference_param in zip(model.named_parameters(), reference.parameters()):
        assert param.dtype == param.grad.dtype == torch.float32, name
        torch.testing.assert_close(param.grad, reference_param.grad, rtol=0, atol=0, msg=name)

    bf16_model = _model("debug").to(torch.bfloat16)
    assert parallelize(bf16_model, ParallelDims(world_size=1), None, BF16_MIXED_PRECISION).autocast is None
    assert not bf16_model._forward_pre_hooks


def _tensor_parallel_mixed_precision_run() -> tuple[torch.dtype, list[float]]:
    """(dtype of the logits, losses) of the debug model under TP=2 with bf16 mixed precision."""
    dims = ParallelDims(world_size=2, tp=2)
    model = _model("debug")
    parallelize(model, dims, dims.build_meshes("cpu"), BF16_MIXED_PRECISION)
    ids = _batch(model.config)
    with torch.no_grad():
        dtype = model(ids).dtype
    return dtype, _train(model, ids)


def test_two_process_tensor_parallel_bf16_mixed_precision_matches_one_process():
    """TP=2 without FSDP: mixed precision by autocast on DTensors, losses as one process under autocast up to
    bf16 rounding."""
    dtype, losses = run_distributed(_tensor_parallel_mixed_precision_run)
    assert dtype == torch.bfloat16
    model = _model("debug")
    parallelize(model, ParallelDims(world_size=1), None, BF16_MIXED_PRECISION)
    expected = _train(model, _batch(model.config))
    torch.testing.assert_close(losses, expected, rtol=5e-4, atol=0)


def test_float8_converts_filtered_linears_and_trains():
    from torchao.float8.float8_linear import Float8Linear

    reference = _reference_losses("debug")
    model = _model("debug")
    dims = ParallelDims(world_size=1)
    parallelize(model, dims, None, ParallelizeSettings(float8=True, float8_emulate=True))
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # debug: 3 GDN layers x (in_proj_qkv, in_proj_z, out_proj) + 1 attention layer x 4 + 4 MLPs x 3
    assert len(converted) == 3 * 3 + 4 + 4 * 3
    kept = {name.rsplit(".", 1)[-1] for name in linears - converted}
    assert kept == {"lm_head", "in_proj_a", "in_proj_b"}
    assert not float8_module_filter(model.lm_head, "lm_head")

    losses = _train(model, _batch(model.config))
    torch.testing.assert_close(losses, reference, rtol=0.05, atol=0)


@pytest.mark.parametrize("flavor, overrides, degrees, message", [
    ("debug", {}, dict(tp=3), "parallelism.tp=3 must divide Qwen35Config.num_attention_heads=4"),
    ("debug", {}, dict(tp=4), "parallelism.tp=4 must divide Qwen35Config.num_key_value_heads=2"),
    ("debug", dict(linear_num_key_heads=1, linear_num_value_heads=2), dict(tp=2),
     "parallelism.tp=2 must divide Qwen35Config.linear_num_key_heads=1"),
    ("debug", dict(vocab_size=2047), dict(tp=2), "parallelism.tp=2 must divide Qwen35Config.vocab_size=2047"),
    ("debug", dict(intermediate_size=385), dict(tp=2),
     "parallelism.tp=2 must divide Qwen35Config.intermediate_size=385"),
    ("debug-moe", {}, dict(dp_shard=3, ep=3), "parallelism.ep=3 must divide Qwen35Config.num_experts=8"),
    ("debug", {}, dict(dp_shard=2, ep=2), "parallelism.ep=2 needs an MoE config"),
])
def test_impossible_model_splits_name_the_key_and_rule(flavor, overrides, degrees, message):
    config = qwen35.Qwen35Config.from_flavor(flavor, **overrides)
    dims = ParallelDims(world_size=degrees.get("tp", 1) * degrees.get("dp_shard", 1), **degrees)
    with pytest.raises(ValueError, match=re.escape(message)):
        parallelize(qwen35.Qwen35ForCausalLM(config), dims, meshes=None)


@pytest.mark.parametrize("degrees, message", [
    (dict(dp_shard=2, tp=2),
     r"dp_replicate \* dp_shard \* cp \* tp = 1 \* 2 \* 1 \* 2 = 4 must equal the world size 2"),
    (dict(tp=3), "world size 2 is not divisible by dp_replicate \\* cp \\* tp = 1 \\* 1 \\* 3"),
    (dict(dp_replicate=2, dp_shard=1, cp=2, world_size=4), r"parallelism\.cp=2 does not compose with dp_replicate"),
    (dict(dp_shard=1, ep=2, tp=2), r"parallelism\.ep=2 must divide parallelism\.dp_shard=1"),
    (dict(tp=0), r"parallelism\.tp must be a positive integer"),
])
def test_degrees_must_multiply_to_world_size(degrees, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**{"world_size": 2, **degrees})


def test_unknown_activation_checkpoint_mode():
    with pytest.raises(ValueError, match=r"activation_checkpoint\.mode must be one of"):
        ParallelizeSettings(activation_checkpoint="some")
