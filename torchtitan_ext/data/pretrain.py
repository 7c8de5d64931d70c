"""Pretraining samples: documents from a weighted mixture of sources, tokenized with <|endoftext|> appended and cut
into windows of seq_len + 1 tokens (input = window[:-1], labels = window[1:]) that carry their document starts.

Consecutive windows overlap by one token, so every token of the stream is a label exactly once. Packing (the
default) fills each window with as many documents as fit, a long document continuing in the next window; the
document starts travel with the window, so no attention, conv window or delta-rule state crosses a document
(`loader.collate` turns them into the model's cu_seqlens). The label of an <|endoftext|> (the next document's
first token) is ignored: nothing before it can predict it. Without packing a window holds tokens of one document
only (a long document spans several windows) and the rest of the window is padding with ignored labels.

Mixing is by tokens and deterministic: the next document comes from the source furthest below its share
(weight / sum of weights) of the tokens read so far, so shares hold exactly over any stretch of training and
resuming needs no random state. The state (sources' cursors, tokens per source, tokens read but not yet in a
window) is part of the checkpoint: a resumed run sees exactly the windows an uninterrupted one would.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.tools.logging import logger

from .sources import DataError, ShardedRecords

PROGRESS_LOG_SECONDS = 60.0


class PretrainWindows(IterableDataset, Stateful):
    """Endless (input [T], labels [T], document starts [n]) windows of one data-parallel rank."""

    def __init__(self, sources: list[ShardedRecords], tokenizer: Qwen35Tokenizer, seq_len: int,
                 packing: bool = True):
        self.sources, self.tokenizer, self.seq_len, self.packing = sources, tokenizer, seq_len, packing
        weights = [s.reader.spec.weight for s in sources]
        if any(w <= 0 for w in weights):
            raise DataError(f"source weights must be positive, got {weights}")
        self.shares = [w / sum(weights) for w in weights]
        self.tokens_read = [0] * len(sources)
        self.documents_read = 0
        self.pending: list[int] = []  # tokens read but not yet emitted (the head of the next window)
        self._last_log = time.monotonic()

    def _next_document(self) -> list[int]:
        total = sum(self.tokens_read)
        i = max(range(len(self.sources)), key=lambda s: self.shares[s] * total - self.tokens_read[s])
        record, where = next(self.sources[i])
        text = record[self.sources[i].reader.spec.text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {self.sources[i].reader.spec.text_field!r} is "
                            f"{type(text).__name__}, not a string")
        ids = self.tokenizer.encode(text) + [self.tokenizer.end_of_text_id]
        self.tokens_read[i] += len(ids)
        self.documents_read += 1
        if time.monotonic() - self._last_log > PROGRESS_LOG_SECONDS:
            self._last_log = time.monotonic()
            per_source = ", ".join(f"{s.reader.spec.path}: {n:,}" for s, n in zip(self.sources, self.tokens_read))
            logger.info(f"data (dp rank {self.sources[0].rank}): {self.documents_read:,} documents, "
                        f"{sum(self.tokens_read):,} tokens read ({per_source})")
        return ids

    def _next_window(self) -> list[int]:
        """The next seq_len + 1 tokens (fewer, padding to come, only without packing at a document's end)."""
        if self.packing:
            while len(self.pending) < self.seq_len + 1:
                self.pending += self._next_document()
        elif not self.pending:
            self.pending = self._next_document()
        window = self.pending[:self.seq_len + 1]
        # keep the window's last token as the next window's first input, unless nothing would follow it
        self.pending = self.pending[self.seq_len:] if len(self.pending) > self.seq_len + 1 else []
        return window

    def __iter__(self):
        eos, T = self.tokenizer.end_of_text_id, self.seq_len
        while True:
            window = torch.tensor(self._next_window(), dtype=torch.int64)
            inputs, labels = window[:-1], window[1:].clone()
            labels[inputs == eos] = IGNORE_INDEX
            starts = [0] + (torch.nonzero(inputs[:-1] == eos).flatten() + 1).tolist()
            if inputs.numel() < T:  # padding (packing off): its own segment, labels ignored
                starts.append(inputs.numel())
                pad = T - inputs.numel()
                inputs = torch.cat([inputs, inputs.new_full((pad,), eos)])
                labels = torch.cat([labels, labels.new_full((pad,), IGNORE_INDEX)])
            yield inputs, labels, torch.tensor(starts, dtype=torch.int32)

    def state_dict(self) -> dict[str, Any]:
        return {"sources": [s.state_dict() for s in self.sources], "tokens_read": list(self.tokens_read),
                "documents_read": self.documents_read, "pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise DataError(f"the checkpoint's data state has {len(state['sources'])} sources, the config "
                            f"{len(self.sources)}: resuming needs the same [data] sources")
        for source, source_state in zip(self.sources, state["sources"]):
            source.load_state_dict(source_state)
        self.tokens_read, self.documents_read = list(state["tokens_read"]), state["documents_read"]
        self.pending = list(state["pending"])
