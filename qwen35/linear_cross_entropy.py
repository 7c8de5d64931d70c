"""Linear + cross entropy over blocks of tokens, never holding more than [chunk_size, vocab] logits.

`linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100, reduction="sum")` with the logits
computed in the weight's dtype and the softmax in fp32, as a model computing logits and then the loss does. Each
block's logits live only while the block is processed: when a gradient is needed, the forward also forms the
block's logit gradient (softmax - one-hot) and from it the block's hidden-state gradient and its share of the
weight gradient (summed over the blocks in fp32), which the backward scales by the incoming gradient. So the logits are
never kept for the backward nor recomputed in it: three matmuls per block, as for full logits, with peak memory
O(chunk_size x vocab) instead of O(tokens x vocab), plus the gradients themselves ([tokens, hidden] and an fp32
[vocab, hidden]) held from the forward to the backward.

Vocab-parallel (tensor parallelism): `weight` is this rank's rows [vocab_start, vocab_start + V_local) of the
vocabulary and `vocab_group` the ranks holding the others; each block's log-sum-exp and target logit are
all-reduced over the group (no rank holds the full logits). `hidden` must then be the same on every rank, and
its gradient here is this rank's partial sum: the caller sums it over the group (e.g. a DTensor gathered from
sequence shards whose local gradient is declared Partial).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, vocab_group: dist.ProcessGroup | None = None,
                         vocab_start: int = 0) -> torch.Tensor:
    """Summed cross entropy of `labels` [...] (IGNORE_INDEX: no loss) under logits hidden [..., H] @ weight.T
    (weight [V or V_local, H]); an fp32 scalar."""
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be positive, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
                         "must agree on every dimension but the last")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk_size,
                                     vocab_group, vocab_start)


def _all_reduce(x: torch.Tensor, op, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, vocab_group, vocab_start):
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_weight_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, labels.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            block_labels = labels[rows]
            valid = block_labels != IGNORE_INDEX
            local, owned = _local_labels(block_labels, vocab_start, weight.shape[0])
            # One fp32 [rows, vocab] buffer, transformed in place: logits, exp(logits - max), softmax, its gradient.
            probs = (hidden[rows] @ weight.T).float()
            target = torch.where(owned, probs.gather(-1, local[:, None]).squeeze(-1), 0.0)
            row_max = _all_reduce(probs.amax(-1), dist.ReduceOp.MAX, vocab_group)
            sum_exp = _all_reduce(probs.sub_(row_max[:, None]).exp_().sum(-1), dist.ReduceOp.SUM, vocab_group)
            lse = row_max + sum_exp.log()
            loss += torch.where(valid, lse - _all_reduce(target, dist.ReduceOp.SUM, vocab_group), 0.0).sum()
            if not (want_hidden_grad or want_weight_grad):
                continue
            # d loss / d logits = softmax - one_hot(label), zero on ignored tokens.
            grad_logits = probs.div_(sum_exp[:, None])
            grad_logits[torch.arange(local.shape[0], device=local.device), local] -= owned.float()
            grad_logits = grad_logits.mul_(valid[:, None]).to(hidden.dtype)
            if want_hidden_grad:
                grad_hidden[rows] = grad_logits @ weight
            if want_weight_grad:
                grad_weight += grad_logits.T @ hidden[rows]  # matmul in the model dtype, sum over blocks in fp32
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if want_weight_grad else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None,
                grad_weight * grad_loss.to(grad_weight.dtype) if grad_weight is not None else None,
                None, None, None, None)


def _local_labels(labels: torch.Tensor, vocab_start: int, local_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index in this shard, 0 where not owned; whether this shard owns the label)."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < local_vocab)
    return torch.where(owned, local, 0), owned
