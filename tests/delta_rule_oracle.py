"""Independent float64 oracle for the gated delta rule: the literal per-token recurrence.

Shared by the tests of every implementation (torch reference, Triton). Deliberately written from the
recurrence in the Gated DeltaNet paper, not from any chunked form.
"""

import torch


def naive_gated_delta_rule_f64(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None,
                               use_qk_l2norm=False):
    """q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; state [N, HV, K, V].

    Returns (o [B, T, HV, V] float64, final_state [N, HV, K, V] float64). Differentiable (autograd
    flows to every input), so gradients of any implementation can be checked against it.
    """
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[-2:]
    group = HV // H
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    scale = K ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        assert B == 1
        bounds = [int(x) for x in cu_seqlens]
        spans = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
    o = [[[None] * HV for _ in range(T)] for _ in range(B)]
    final = [[None] * HV for _ in spans]
    for n, (b, start, end) in enumerate(spans):
        for hv in range(HV):
            h = hv // group
            S = torch.zeros(K, V, dtype=torch.float64)
            if initial_state is not None:
                S = initial_state[n, hv].double()
            for t in range(start, end):
                S = S * torch.exp(g[b, t, hv])
                kt = k[b, t, h]
                S = S + torch.outer(kt, beta[b, t, hv] * (v[b, t, hv] - S.T @ kt))
                o[b][t][hv] = S.T @ (q[b, t, h] * scale)
            final[n][hv] = S
    o = torch.stack([torch.stack([torch.stack(row) for row in seq]) for seq in o])
    final = torch.stack([torch.stack(heads) for heads in final])
    return o, final
