"""What pretraining and SFT windows share: padding a short window to seq_len."""

from __future__ import annotations

import torch
from torchtitan.components.loss import IGNORE_INDEX


def pad_window(inputs: torch.Tensor, labels: torch.Tensor, starts: list[int], seq_len: int,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input [seq_len], labels [seq_len], segment starts int32) of a window of inputs / labels [n <= seq_len]:
    a short window is padded with `pad_id` and ignored labels, the padding a segment of its own (no start for it
    when the window is empty, as its first segment already starts at 0)."""
    pad = seq_len - inputs.numel()
    if pad:
        if inputs.numel():
            starts = starts + [inputs.numel()]
        inputs = torch.cat([inputs, inputs.new_full((pad,), pad_id)])
        labels = torch.cat([labels, labels.new_full((pad,), IGNORE_INDEX)])
    return inputs, labels, torch.tensor(starts, dtype=torch.int32)
