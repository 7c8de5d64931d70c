"""Supervised fine-tuning samples: conversations rendered with the chat template, loss on the assistant replies only.

Records are chat (`{"messages": [{"role", "content"}, ...]}`) or GSM8K (`{"question", "answer"}`, mapped to a
user turn and an assistant turn; the answer keeps its `#### N` line). A conversation's tokens are trained where
`Qwen35Tokenizer.encode_chat` marks them (assistant content and its closing <|im_end|>); labels elsewhere —
system and user turns, the role headers, the newline after <|im_end|> — are ignored (-100).

All records are tokenized up front (SFT sets are small: GSM8K is 7,473 conversations), with progress logs, so a
dataset that ends up empty fails before the first step. A conversation longer than seq_len + 1 tokens is
truncated or dropped (`too_long`), counted and logged; one left with nothing to train on is dropped and counted.

Windows: each epoch orders the samples by a permutation seeded with (seed, epoch) and packs them greedily into
windows of seq_len tokens (a sample that does not fit starts the next window; never split), the remainder of a
window being padding with ignored labels; without packing a window holds one sample. The windows of all epochs,
one after the other, are dealt round robin to the data-parallel ranks (`position.GlobalPosition`, items = windows),
so the checkpoint holds one global position and a run resumes on any number of ranks with the next windows.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import IterableDataset

from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.tools.logging import logger

from .position import GlobalPosition, RankCursor
from .sources import DataError, SourceSpec, open_reader, string_field
from .windows import pad_window

SFT_FORMATS = {"chat": ("messages",), "gsm8k": ("question", "answer")}
ROLES = ("system", "user", "assistant", "tool")
PROGRESS_LOG_SAMPLES = 10_000


def detect_format(record: dict, source: str) -> str:
    for fmt, fields in SFT_FORMATS.items():
        if all(f in record for f in fields):
            return fmt
    raise DataError(f"{source}: cannot tell the SFT format from the fields {', '.join(record) or 'none'}: expected "
                    "'messages' (chat) or 'question' + 'answer' (gsm8k)")


def to_messages(record: dict, fmt: str, where: str) -> list[dict[str, str]]:
    """A record as chat messages (checked: roles known, contents strings, at least one assistant turn)."""
    if fmt == "gsm8k":
        return [{"role": "user", "content": string_field(record, "question", where)},
                {"role": "assistant", "content": string_field(record, "answer", where)}]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] needs the fields 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {message['role']!r}; known roles: {', '.join(ROLES)}")
        string_field(message, "content", f"{where}: messages[{i}]")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, nothing to train on")
    return messages


class SFTSamples:
    """Tokenized conversations: sample i is input ids [L_i] and labels [L_i] (ignored = -100), L_i <= seq_len."""

    def __init__(self, specs: list[SourceSpec], tokenizer: Qwen35Tokenizer, seq_len: int, too_long: str = "truncate",
                 sft_format: str = "auto", template_kwargs: dict[str, Any] | None = None):
        inputs, labels = [], []
        self.pad_id = tokenizer.end_of_text_id
        self.truncated = self.dropped_too_long = self.dropped_untrained = 0
        started = time.monotonic()
        for spec in specs:
            fmt = detect_format(open_reader(spec).first_record(), spec.path) if sft_format == "auto" else sft_format
            reader = open_reader(spec, SFT_FORMATS[fmt])
            for record, where in reader.read():
                ids, trained = tokenizer.encode_chat(to_messages(record, fmt, where), **(template_kwargs or {}))
                too_long_sample = len(ids) > seq_len + 1
                if too_long_sample and too_long == "drop":
                    self.dropped_too_long += 1
                    continue
                ids, trained = ids[:seq_len + 1], trained[:seq_len + 1]
                sample_labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]
                if all(t == IGNORE_INDEX for t in sample_labels):  # e.g. truncated before the reply
                    self.dropped_untrained += 1
                    continue
                self.truncated += too_long_sample
                inputs.append(torch.tensor(ids[:-1], dtype=torch.int64))
                labels.append(torch.tensor(sample_labels, dtype=torch.int64))
                if len(inputs) % PROGRESS_LOG_SAMPLES == 0:
                    logger.info(f"data: tokenized {len(inputs):,} SFT samples, "
                                f"{sum(x.numel() for x in inputs):,} tokens ({time.monotonic() - started:.0f} s)")
        self.inputs, self.labels = inputs, labels
        sources = ", ".join(s.path for s in specs)
        logger.info(f"data: {len(inputs):,} SFT samples, {sum(x.numel() for x in inputs):,} tokens, "
                    f"{sum(int((y != IGNORE_INDEX).sum()) for y in labels):,} trained, from {sources}; longer than "
                    f"seq_len + 1 = {seq_len + 1}: {self.truncated} truncated, {self.dropped_too_long} dropped; "
                    f"{self.dropped_untrained} dropped with no assistant token left")
        if not inputs:
            raise DataError(f"no SFT sample left from {sources} (seq_len {seq_len}, too_long = {too_long!r}: "
                            f"{self.dropped_too_long} dropped as too long, {self.dropped_untrained} with no "
                            "assistant token)")

    def __len__(self) -> int:
        return len(self.inputs)


class SFTWindows(IterableDataset):
    """Endless (input [T], labels [T], sample starts [n]) windows of one data-parallel rank."""

    def __init__(self, samples: SFTSamples, seq_len: int, dp_rank: int, dp_world_size: int, packing: bool = True,
                 seed: int = 0):
        self.samples, self.seq_len, self.packing, self.seed = samples, seq_len, packing, seed
        self.cursor = RankCursor(dp_rank, dp_world_size)
        self.epoch = 0
        self._epoch_starts = [0]  # the global number of each epoch's first window, as far as computed
        self._windows: list[list[int]] = []
        self._windows_epoch = None
        if len(self._epoch_windows()) < dp_world_size:
            raise DataError(f"the SFT data fills {len(self._windows)} windows of seq_len {seq_len}, fewer than the "
                            f"{dp_world_size} data-parallel ranks")

    def _epoch_windows(self, epoch: int = 0) -> list[list[int]]:
        """An epoch's windows, each a list of sample numbers."""
        if self._windows_epoch != epoch:
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch)).tolist()
            windows, current, used = [], [], 0
            for i in order:
                length = self.samples.inputs[i].numel()
                if current and (not self.packing or used + length > self.seq_len):
                    windows.append(current)
                    current, used = [], 0
                current.append(i)
                used += length
            windows.append(current)
            self._windows, self._windows_epoch = windows, epoch
        return self._windows

    def _locate(self, window: int) -> tuple[int, int]:
        """(epoch, window within it) of a global window number."""
        epoch = next((e for e in range(len(self._epoch_starts) - 1) if window < self._epoch_starts[e + 1]), None)
        while epoch is None:
            last = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self._epoch_windows(last)))
            epoch = last if window < self._epoch_starts[-1] else None
        return epoch, window - self._epoch_starts[epoch]

    def __iter__(self):
        while True:
            epoch, j = self._locate(self.cursor.item())
            if epoch > self.epoch:
                self.epoch = epoch
                logger.info(f"data: SFT epoch {self.epoch} begins (dp rank {self.cursor.rank})")
            sample_ids = self._epoch_windows(epoch)[j]
            self.cursor.next_item()
            inputs = torch.cat([self.samples.inputs[i] for i in sample_ids])
            labels = torch.cat([self.samples.labels[i] for i in sample_ids])
            lengths = torch.tensor([0] + [self.samples.inputs[i].numel() for i in sample_ids])
            yield pad_window(inputs, labels, lengths.cumsum(0)[:-1].tolist(), self.seq_len, self.samples.pad_id)

    def rank_state(self) -> dict[str, Any]:
        return {"position": self.cursor.position, "progress": self.cursor.progress()}

    @staticmethod
    def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        return {"position": vars(states[0]["position"]), "progress": [s["progress"] for s in states]}

    def load_global_state(self, state: dict[str, Any]) -> None:
        self.cursor.load(GlobalPosition(**state["position"]), state["progress"])
