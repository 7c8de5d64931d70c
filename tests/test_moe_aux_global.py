"""The MoE load-balancing term under data parallelism is the statistic of the global batch (torchtitan_ext/loss.py):
- on 2 gloo processes holding different rows, the per-rank terms add up to `load_balancing_loss` of the rows of
  both (value and gradients w.r.t. the router logits), where the old rule (token-weighted mean of per-rank losses)
  is off; on 2 processes holding the same rows (tensor-parallel replicas) each rank gives the 1-process value;
- through the trainer (torchrun, 2 processes: FSDP, FSDP + EP, TP, FSDP with 2 microbatches per step) with the aux
  loss on, the logged losses of the first 3 steps equal a 1-process run with the same global batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed_utils import run_distributed
from qwen35.moe import load_balancing_loss, router_statistics
from test_train_distributed import (DP2, EP2, TP2, _assert_matches_one_process, _torchrun,  # noqa: F401
                                    dealt_data)  # dealt_data: a fixture
from torchtitan_ext.loss import Qwen35Loss, global_balancing_share
from torchtitan_ext.model import TrainingOutput

E, TOP_K, LAYERS, ROWS, VOCAB, COEF = 8, 2, 3, 24, 16, 0.5  # ROWS tokens per rank, per layer


def _batch(seed: int):
    """Router logits [LAYERS][2 * ROWS, E], logits [1, 2 * ROWS, VOCAB], labels [1, 2 * ROWS] for two ranks (rank r
    holds token rows r * ROWS ...). Routing is skewed differently on each half, so per-rank balancing losses differ
    from the global one; the halves have different numbers of valid labels."""
    g = torch.Generator().manual_seed(seed)
    router = [torch.randn(2 * ROWS, E, generator=g) for _ in range(LAYERS)]
    for layer in router:
        layer[:ROWS, 0] += 2.0
        layer[ROWS:, 1:3] += 1.0
    logits = torch.randn(1, 2 * ROWS, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (1, 2 * ROWS), generator=g)
    labels[0, :5] = -100  # rank 0: ROWS - 5 valid tokens, rank 1: ROWS - 1
    labels[0, ROWS + 3] = -100
    return router, logits, labels


def _loss_and_router_grads(router, logits, labels, global_valid_tokens):
    """Qwen35Loss of one rank's rows, with the grads w.r.t. its router logits."""
    router = [r.clone().requires_grad_() for r in router]
    # Hidden states `logits` under an identity lm_head: the loss sees exactly these logits.
    out = TrainingOutput(logits, torch.eye(VOCAB), router_statistics(router, E, TOP_K), COEF)
    loss, _ = Qwen35Loss.Config().build()(out, labels, global_valid_tokens)
    return loss.detach(), torch.autograd.grad(loss, router)


def _on_two_ranks() -> dict:
    rank = dist.get_rank()
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    router, logits, labels = _batch(seed=0)
    result = {}

    # Different rows per rank (data parallel): the shares of the balancing loss, then the whole loss.
    local_router = [r[mine].clone().requires_grad_() for r in router]
    valid = (labels[:, mine] != -100).sum()
    share, global_valid = global_balancing_share(router_statistics(local_router, E, TOP_K), valid)
    grads = torch.autograd.grad(share, local_router)
    result["global_valid"] = global_valid.item()
    result["shares"] = _gather(share.detach().reshape(1))
    result["share_grads"] = [_gather(g) for g in grads]
    result["own_balancing_losses"] = _gather(load_balancing_loss([r[mine] for r in router], E, TOP_K).reshape(1))
    result["valid"] = _gather(valid.reshape(1))
    global_valid_tokens = (labels != -100).sum()  # what torchtitan passes: summed over data-parallel ranks
    loss, grads = _loss_and_router_grads([r[mine] for r in router], logits[:, mine], labels[:, mine],
                                         global_valid_tokens)
    result["losses"] = _gather(loss.reshape(1))
    result["loss_grads"] = [_gather(g) for g in grads]

    # The same rows on both ranks (tensor-parallel replicas; global_valid_tokens counts them once).
    result["replica_loss"], result["replica_grads"] = _loss_and_router_grads(router, logits, labels,
                                                                             global_valid_tokens)
    result["replica_losses"] = _gather(result["replica_loss"].reshape(1))
    return result


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's and rank 1's tensors, concatenated on dim 0."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def test_two_ranks_add_up_to_the_global_balancing_loss():
    result = run_distributed(_on_two_ranks)
    router, logits, labels = _batch(seed=0)
    router = [r.clone().requires_grad_() for r in router]
    expected = load_balancing_loss(router, E, TOP_K)
    expected_grads = torch.autograd.grad(expected, router)

    # Shares: value and gradient of the balancing loss of all rows (the all-reduce carries no gradient).
    assert result["global_valid"] == (labels != -100).sum().item() == 2 * ROWS - 6
    torch.testing.assert_close(result["shares"].sum(), expected.detach(), rtol=1e-6, atol=0)
    for got, want in zip(result["share_grads"], expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # The old rule (each rank's own balancing loss weighted by its token share) is measurably different here.
    old = (result["own_balancing_losses"] * result["valid"]).sum() / result["valid"].sum()
    assert abs(old - expected.item()) > 1e-2 * expected.item()

    # Whole loss: the ranks' losses add up to the 1-process loss on all rows, with the same router gradients.
    one, one_grads = _loss_and_router_grads(router, logits, labels, (labels != -100).sum())
    ce = F.cross_entropy(logits[0], labels[0], ignore_index=-100)
    torch.testing.assert_close(one, ce + COEF * expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(result["losses"].sum(), one, rtol=1e-6, atol=0)
    for got, want in zip(result["loss_grads"], one_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)

    # Replicas: each rank gives the 1-process value and gradients (the replica count cancels).
    torch.testing.assert_close(result["replica_losses"], one.expand(2), rtol=1e-6, atol=0)
    for got, want in zip(result["replica_grads"], one_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ the trainer on 2 processes (torchrun, gloo)
# A large coefficient makes the term a visible part of the loss (about 1.0 of 8.6 at step 1). Data-parallel runs
# train on SFT windows dealt to the ranks (`dealt_data`, see test_train_distributed.py), so they see the 1-process
# global batch; SFT labels ignore prompts and padding, which exercises the valid-token weights.
AUX = ("--model.flavor", "debug-moe", "--model.router_aux_loss_coef", str(COEF))
ACCUM = ("--training.global_batch_size", "8")  # 2 microbatches of the 4-window global batch per step


@pytest.mark.parametrize("overrides, common, applied", [
    pytest.param(DP2, (), "dp_shard=2", id="fsdp2"),
    pytest.param((*DP2, *EP2), (), "dp_shard=2, ep=2", id="fsdp2-ep2"),
    # Tensor-parallel ranks share their batch: the statistics all-reduced over both count it twice, which cancels.
    pytest.param(TP2, (), "tp=2", id="tp2"),
    # Gradient accumulation: each microbatch's global statistic, weighted by its share of the step's valid tokens.
    pytest.param(DP2, ACCUM, "dp_shard=2", id="fsdp2-accumulation"),
])
def test_moe_aux_loss_on_two_ranks_matches_one_process(tmp_path, tmp_path_factory, dealt_data, overrides, common,
                                                        applied):
    # The old rule (each rank's own balancing loss, token-weighted) is off by ~3e-4 relative at steps 2 and 3.
    log = _torchrun(tmp_path, *dealt_data, *overrides, *AUX, *common)
    _assert_matches_one_process(tmp_path, tmp_path_factory, log, applied, (*dealt_data, *AUX, *common))
