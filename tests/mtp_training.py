"""A plain training loop with the MTP loss (main cross entropy + mean MTP cross entropy), for tests and benchmarks."""

from collections.abc import Callable

import torch

from qwen35.mtp import mtp_loss_terms


def train_with_mtp(model, windows: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float,
                   seed: int = 0) -> tuple[float, float]:
    """AdamW steps on windows(generator) [B, T+1] (input = window[:, :-1], labels = window[:, 1:]); returns the
    last step's (main loss, MTP loss). Leaves the model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        window = windows(generator)
        ids, labels = window[:, :-1], window[:, 1:]
        logits, hidden = model(ids, output="logits_and_hidden")
        mtp_sum, mtp_count = mtp_loss_terms(hidden, ids, labels, None, model)
        main_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        (main_loss + mtp_sum / mtp_count).backward()
        optimizer.step()
    model.eval()
    return main_loss.item(), (mtp_sum / mtp_count).item()


def corpus_windows(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of seq_len + 1 tokens of the 1-D token tensor `data`."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
    return torch.stack([data[s:s + seq_len + 1] for s in starts])
