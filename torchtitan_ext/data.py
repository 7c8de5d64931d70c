"""Pretraining data: JSON-lines documents packed into seq_len windows with document boundaries as cu_seqlens.

Documents are shuffled once with a fixed seed (a corpus is often sorted by source, which would make the loss
follow the source rather than training progress); each is tokenized and followed by the tokenizer's EOS; the
concatenation is cut into consecutive
windows of seq_len + 1 tokens (input = window[:-1], labels = window[1:]). A batch of B windows is folded into
one packed row [1, B * seq_len] (the layout the qwen35 model takes with cu_seqlens), with a boundary after
every EOS and at every window start, so no attention, conv window or delta-rule state crosses a document.
The label of an EOS (the next document's first token) is ignored: nothing before it can predict it.

Window k of the (repeating) stream goes to data-parallel rank k % dp_world_size; the dataloader state is the
index of the next window, so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from .debug_assets import read_texts


DOCUMENT_ORDER_SEED = 0


def tokenize_documents(texts: list[str], tokenizer: HuggingFaceTokenizer) -> torch.Tensor:
    """All documents in a fixed shuffled order, each followed by EOS, as one int64 stream."""
    if tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer.tokenizer_path}: the tokenizer defines no eos_token (tokenizer_config.json), "
                         "needed to separate packed documents")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(DOCUMENT_ORDER_SEED)).tolist()
    stream: list[int] = []
    for encoding in tokenizer.tokenizer.encode_batch([texts[i] for i in order], add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(tokenizer.eos_id)
    return torch.tensor(stream, dtype=torch.int64)


class PackedWindows(IterableDataset, Stateful):
    """Endless (input, labels) windows of this rank, in a fixed order."""

    def __init__(self, stream: torch.Tensor, eos_id: int, seq_len: int, dp_rank: int, dp_world_size: int):
        self.stream, self.eos_id, self.seq_len = stream, eos_id, seq_len
        self.windows_per_epoch = stream.numel() // (seq_len + 1)
        if self.windows_per_epoch == 0:
            raise ValueError(f"the corpus has {stream.numel()} tokens, fewer than one window of "
                             f"training.seq_len + 1 = {seq_len + 1}")
        self.dp_world_size = dp_world_size
        self.next_window = dp_rank

    def __iter__(self):
        while True:
            start = (self.next_window % self.windows_per_epoch) * (self.seq_len + 1)
            self.next_window += self.dp_world_size
            window = self.stream[start:start + self.seq_len + 1]
            inputs, labels = window[:-1], window[1:].clone()
            labels[inputs == self.eos_id] = IGNORE_INDEX
            yield inputs, labels

    def state_dict(self) -> dict[str, Any]:
        return {"next_window": self.next_window}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_window = state_dict["next_window"]


def pack_batch(samples: list[tuple[torch.Tensor, torch.Tensor]], eos_id: int):
    """B windows -> ({"input": [1, B*T], "cu_seqlens": int32 [N+1]}, labels [1, B*T])."""
    inputs = torch.cat([s[0] for s in samples])
    labels = torch.cat([s[1] for s in samples])
    seq_len = samples[0][0].numel()
    starts = set(range(0, inputs.numel() + 1, seq_len))
    starts.update((torch.nonzero(inputs == eos_id).flatten() + 1).tolist())
    cu_seqlens = torch.tensor(sorted(starts), dtype=torch.int32)
    return {"input": inputs[None], "cu_seqlens": cu_seqlens}, labels[None]


class PackedTextDataLoader(ParallelAwareDataloader):
    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        pass  # dataset_path (inherited): the JSON-lines corpus

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: HuggingFaceTokenizer,
                 seq_len: int, local_batch_size: int, snapshot_every_n_steps: int | None = 1):
        stream = tokenize_documents(read_texts(Path(config.dataset_path)), tokenizer)
        dataset = PackedWindows(stream, tokenizer.eos_id, seq_len, dp_rank, dp_world_size)
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size,
                         collate_fn=functools.partial(pack_batch, eos_id=tokenizer.eos_id),
                         num_workers=config.num_workers, pin_memory=config.pin_memory,
                         persistent_workers=config.persistent_workers, prefetch_factor=config.prefetch_factor,
                         snapshot_every_n_steps=snapshot_every_n_steps)
