"""Input checks shared by the public kernel entry points."""

import torch


def num_sequences(batch_size: int, cu_seqlens: torch.Tensor | None) -> int:
    """N, the number of independent sequences (and states): B, or len(cu_seqlens) - 1 for a packed row.
    Checks only shapes and dtype (values would need a device-to-host sync)."""
    if cu_seqlens is None:
        return batch_size
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [N + 1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if batch_size != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed along T and B must be 1, got B={batch_size}")
    return cu_seqlens.numel() - 1
