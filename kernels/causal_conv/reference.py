"""Pure-torch causal depthwise conv1d (the short conv in front of the gated delta rule), channels last.

y[t, c] = sum_j weight[c, j] * x[t - (W - 1) + j, c], optionally followed by SiLU. The conv state [N, C, W]
holds the last W pre-conv inputs (transformers' layout), zero left-padded when fewer inputs were seen.
"""

import torch
import torch.nn.functional as F


def _activate(y, activation):
    return F.silu(y) if activation == "silu" else y


def _taps(x_ext, weight, T):
    """sum_j weight[:, j] * x_ext[j : j + T] for x_ext [B, T + W - 1, C] (the W - 1 inputs before t = 0 first).

    W shifted multiply-adds stay channels last: no transposes, and cheaper on CPU than a grouped F.conv1d.
    """
    y = x_ext[:, :T] * weight[:, 0]
    for j in range(1, weight.shape[1]):
        y = torch.addcmul(y, x_ext[:, j:j + T], weight[:, j])
    return y


def causal_conv1d(x, weight, initial_state=None, output_final_state=False, cu_seqlens=None, activation="silu"):
    """Shapes and semantics: `kernels.causal_conv1d`. Returns (y [B, T, C] in x's dtype, final state or None)."""
    B, T, C = x.shape
    W = weight.shape[1]
    xw = x.to(weight.dtype)
    if cu_seqlens is None:
        if initial_state is None:
            x_ext = F.pad(xw, (0, 0, W - 1, 0))
        else:
            x_ext = torch.cat([initial_state[:, :, 1:].to(weight.dtype).transpose(1, 2), xw], dim=1)
        y = _taps(x_ext, weight, T)
        # x_ext ends with every input seen so far; its last W rows are the state (T >= 1).
        final = x_ext[:, -W:].transpose(1, 2) if output_final_state else None
    else:
        # Each sequence n gets its own W-row prefix (its initial state, or zeros) in an extended packed layout
        # [prefix_0, seq_0, prefix_1, seq_1, ...], so no window reaches into the previous sequence. Index
        # arithmetic stays on tensors (no host sync).
        N = cu_seqlens.numel() - 1
        positions = torch.arange(T, device=x.device)
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        seq_offset = torch.arange(N, device=x.device)[:, None] * W  # rows added before sequence n's prefix
        window = torch.arange(W, device=x.device)
        token_rows = positions + (torch.searchsorted(ends, positions, right=True) + 1) * W
        rows, src = [token_rows], [xw[0]]
        if initial_state is not None:
            rows.append((starts[:, None] + seq_offset + window).reshape(-1))
            src.append(initial_state.to(weight.dtype).transpose(1, 2).reshape(N * W, C))
        x_ext = xw.new_zeros(T + N * W, C).index_copy(0, torch.cat(rows), torch.cat(src))[None]
        y = _taps(x_ext, weight, T + N * W - (W - 1))[0].index_select(0, token_rows - (W - 1))[None]
        final = None
        if output_final_state:
            # The last W rows of each extended sequence (they reach into its prefix when it is shorter than W).
            last_rows = (ends[:, None] + seq_offset + window).reshape(-1)
            final = x_ext[0].index_select(0, last_rows).view(N, W, C).transpose(1, 2)
    if final is not None:
        final = final.to(x.dtype).contiguous()
    return _activate(y, activation).to(x.dtype), final


def causal_conv1d_update(x, conv_state, weight, activation="silu"):
    """One decode step: x [B, C]; conv_state [B, C, W] shifted left and appended to in place; returns y [B, C]."""
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    y = (conv_state.to(weight.dtype) * weight).sum(-1)
    return _activate(y, activation).to(x.dtype)
