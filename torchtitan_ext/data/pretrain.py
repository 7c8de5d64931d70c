"""Pretraining samples: documents from a weighted mixture of sources, tokenized with <|endoftext|> appended and cut
into windows of seq_len + 1 tokens (input = window[:-1], labels = window[1:]) that carry their document starts.

Consecutive windows overlap by one token, so every token of the stream is a label exactly once. Packing (the
default) fills each window with as many documents as fit, a long document continuing in the next window; the
document starts travel with the window, so no attention, conv window or delta-rule state crosses a document
(`loader.collate` turns them into the model's cu_seqlens). The label of an <|endoftext|> (the next document's
first token) is ignored: nothing before it can predict it. Without packing a window holds tokens of one document
only (a long document spans several windows) and the rest of the window is padding with ignored labels.

Mixing is by tokens and deterministic: the next read (64 documents, tokenized as one batch) comes from the source
furthest below its share (weight / sum of weights) of the tokens read so far, so shares hold to within one read
over any stretch of training and resuming needs no random state.

Resuming: a checkpoint holds one global state (`merge_rank_states`): the sources' positions the run started from,
every rank's progress through them, tokens read per source and tokens read but not yet in a window. On the same
world size each rank continues exactly (the windows of an uninterrupted run); on W' ranks (`load_global_state`)
rank r continues the sources' merged position (`position.GlobalPosition`) and takes the unfinished tokens of old
ranks r, r + W', ... So every document read is trained on exactly once and none is skipped, whatever the resumes.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import IterableDataset

from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.tools.logging import logger

from .position import GlobalPosition
from .sources import DataError, SourceStream, string_field
from .windows import pad_window

PROGRESS_LOG_SECONDS = 60.0


class PretrainWindows(IterableDataset):
    """Endless (input [T], labels [T], document starts [n]) windows of one data-parallel rank."""

    def __init__(self, sources: list[SourceStream], tokenizer: Qwen35Tokenizer, seq_len: int,
                 packing: bool = True, documents_per_read: int = 64):
        self.sources, self.tokenizer, self.seq_len, self.packing = sources, tokenizer, seq_len, packing
        self.documents_per_read = documents_per_read
        weights = [s.reader.spec.weight for s in sources]
        if any(w <= 0 for w in weights):
            raise DataError(f"source weights must be positive, got {weights}")
        self.shares = [w / sum(weights) for w in weights]
        self.tokens_read = [0] * len(sources)
        self.documents_read = 0
        # read but not yet emitted: tokens (packing) or documents' tokens (no packing)
        self.pending: list = []
        self._last_log = time.monotonic()

    def _read_documents(self) -> list[list[int]]:
        """The next `documents_per_read` documents of the source furthest below its share, tokenized together
        (the tokenizers library encodes a batch on all cores) and each followed by <|endoftext|>."""
        total = sum(self.tokens_read)
        i = max(range(len(self.sources)), key=lambda s: self.shares[s] * total - self.tokens_read[s])
        field = self.sources[i].reader.spec.text_field
        texts = []
        for _ in range(self.documents_per_read):
            record, where = next(self.sources[i])
            texts.append(string_field(record, field, where))
        documents = [ids + [self.tokenizer.end_of_text_id] for ids in self.tokenizer.encode_batch(texts)]
        self.tokens_read[i] += sum(map(len, documents))
        self.documents_read += len(documents)
        if time.monotonic() - self._last_log > PROGRESS_LOG_SECONDS:
            self._last_log = time.monotonic()
            per_source = ", ".join(f"{s.reader.spec.path}: {n:,}" for s, n in zip(self.sources, self.tokens_read))
            logger.info(f"data (dp rank {self.sources[0].cursor.rank}): {self.documents_read:,} documents, "
                        f"{sum(self.tokens_read):,} tokens read ({per_source})")
        return documents

    def _next_window(self) -> list[int]:
        """The next seq_len + 1 tokens (fewer, padding to come, only without packing at a document's end)."""
        if self.packing:
            while len(self.pending) < self.seq_len + 1:
                self.pending += [token for document in self._read_documents() for token in document]
            window = self.pending[:self.seq_len + 1]
            self.pending = self.pending[self.seq_len:]  # the last token is the next window's first input
            return window
        if not self.pending:
            self.pending = self._read_documents()
        document = self.pending[0]
        window = document[:self.seq_len + 1]
        if len(document) > self.seq_len + 1:
            self.pending[0] = document[self.seq_len:]
        else:
            self.pending.pop(0)
        return window

    def __iter__(self):
        eos, T = self.tokenizer.end_of_text_id, self.seq_len
        while True:
            window = torch.tensor(self._next_window(), dtype=torch.int64)
            inputs, labels = window[:-1], window[1:].clone()
            labels[inputs == eos] = IGNORE_INDEX
            starts = [0] + (torch.nonzero(inputs[:-1] == eos).flatten() + 1).tolist()
            yield pad_window(inputs, labels, starts, T, eos)  # short only without packing, at a document's end

    def rank_state(self) -> dict[str, Any]:
        """This rank's read state; `merge_rank_states` of all ranks' states is what a checkpoint holds."""
        return {"positions": [s.cursor.position for s in self.sources],
                "progress": [s.cursor.progress() for s in self.sources],
                "tokens_read": list(self.tokens_read), "documents_read": self.documents_read,
                "pending": list(self.pending)}

    @staticmethod
    def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """The global read state of ranks 0 .. W-1 (their `rank_state`s, which started from the same state)."""
        return {"positions": [vars(p) for p in states[0]["positions"]],
                "progress": [[s["progress"][i] for s in states] for i in range(len(states[0]["positions"]))],
                **{key: [s[key] for s in states] for key in ("tokens_read", "documents_read", "pending")}}

    def load_global_state(self, state: dict[str, Any]) -> None:
        """Continue from a global read state as this rank of this run's world size."""
        if len(state["positions"]) != len(self.sources):
            raise DataError(f"the checkpoint's data state has {len(state['positions'])} sources, the config "
                            f"{len(self.sources)}: resuming needs the same [data] sources")
        for source, position, progress in zip(self.sources, state["positions"], state["progress"]):
            source.load(GlobalPosition(**position), progress)
        rank, world = self.sources[0].cursor.rank, self.sources[0].cursor.world
        if len(state["pending"]) == world:
            self.tokens_read, self.documents_read = list(state["tokens_read"][rank]), state["documents_read"][rank]
        else:  # mixing continues from an even split of the totals (they only steer which source is read next)
            self.tokens_read = [sum(per_source) // world for per_source in zip(*state["tokens_read"])]
            self.documents_read = sum(state["documents_read"]) // world
        self.pending = [x for pending in state["pending"][rank::world] for x in pending]
