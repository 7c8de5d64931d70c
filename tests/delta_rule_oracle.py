"""Independent float64 oracle for the gated delta rule: the literal per-token recurrence.

Shared by the tests of every implementation (torch reference, Triton). Deliberately written from the
recurrence in the Gated DeltaNet paper, not from any chunked form. Independent sequences (batch rows, packed
documents of equal length) and value heads step together, so packed batches of thousands of short documents cost
one Python step per token position, not per token.
"""

import torch


def _recurrence(q, k, v, g, beta, state):
    """q, k [N, L, HV, K]; v [N, L, HV, V]; g, beta [N, L, HV]; state [N, HV, K, V] -> (o [N, L, HV, V], state)."""
    outputs = []
    for t in range(q.shape[1]):
        state = state * torch.exp(g[:, t])[..., None, None]
        k_t = k[:, t]
        prediction = torch.einsum("nhkv,nhk->nhv", state, k_t)
        state = state + k_t[..., None] * (beta[:, t, :, None] * (v[:, t] - prediction))[..., None, :]
        outputs.append(torch.einsum("nhkv,nhk->nhv", state, q[:, t]))
    return torch.stack(outputs, 1), state


def naive_gated_delta_rule_f64(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None,
                               use_qk_l2norm=False):
    """q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; state [N, HV, K, V].

    Returns (o [B, T, HV, V] float64, final_state [N, HV, K, V] float64). Differentiable (autograd
    flows to every input), so gradients of any implementation can be checked against it. Tokens after
    cu_seqlens[-1] belong to no sequence: their output is 0 and they influence nothing.
    """
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[-2:]
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    scale = K ** -0.5 if scale is None else scale
    # value head j reads q/k head j // (HV // H)
    q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q * scale, k))
    if cu_seqlens is None:
        N = B
        initial = torch.zeros(N, HV, K, V, dtype=torch.float64) if initial_state is None else initial_state.double()
        return _recurrence(q, k, v, g, beta, initial)

    assert B == 1
    bounds = [int(x) for x in cu_seqlens]
    N = len(bounds) - 1
    initial = torch.zeros(N, HV, K, V, dtype=torch.float64) if initial_state is None else initial_state.double()
    o = torch.zeros(T, HV, V, dtype=torch.float64)
    final = initial.clone()
    by_length = {}
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        by_length.setdefault(end - start, []).append(n)
    for length, seqs in by_length.items():
        if length == 0:
            continue
        tokens = torch.tensor([bounds[n] for n in seqs])[:, None] + torch.arange(length)
        o_seqs, final_seqs = _recurrence(q[0, tokens], k[0, tokens], v[0, tokens], g[0, tokens], beta[0, tokens],
                                         initial[seqs])
        o = o.index_put((tokens.flatten(),), o_seqs.flatten(0, 1))
        final = final.index_put((torch.tensor(seqs),), final_seqs)
    return o[None], final
