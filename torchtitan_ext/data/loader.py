"""The torchtitan side of the data pipeline: the tokenizer torchtitan builds, the dataloader it builds, and the
collation of a batch of windows into the packed row the qwen35 model takes.

A batch of B windows [T] becomes one row [1, B * T] with `cu_seqlens` (int32) holding every document / sample /
padding start of every window and the end, so the model's positions, conv windows, delta-rule states and
attention all restart at each boundary. The dataloader state (through torchdata's StatefulDataLoader and the
dataset's `state_dict`) is saved in torchtitan's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer

from .pretrain import PretrainWindows
from .sft import SFTSamples, SFTWindows
from .sources import ShardedRecords, SourceSpec, open_reader


class TitanTokenizer(BaseTokenizer):
    """torchtitan's tokenizer interface over `qwen35.tokenizer.Qwen35Tokenizer` (in `.qwen`)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config, *, tokenizer_path: str):
        super().__init__()
        self.qwen = Qwen35Tokenizer.from_dir(tokenizer_path)
        self.eos_id = self.qwen.end_of_text_id

    def encode(self, text: str) -> list[int]:
        return self.qwen.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.qwen.decode(ids)

    def get_vocab_size(self) -> int:
        return self.qwen.vocab_size


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """B windows (input [T], labels [T], starts [n]) -> ({"input": [1, B*T], "cu_seqlens": int32}, labels [1, B*T])."""
    T = samples[0][0].numel()
    starts = [s[2] + b * T for b, s in enumerate(samples)]
    cu_seqlens = torch.cat(starts + [torch.tensor([len(samples) * T], dtype=torch.int32)]).to(torch.int32)
    inputs = torch.cat([s[0] for s in samples])[None]
    labels = torch.cat([s[1] for s in samples])[None]
    return {"input": inputs, "cu_seqlens": cu_seqlens}, labels


class Qwen35DataLoader(ParallelAwareDataloader):
    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        kind: Literal["pretrain", "sft"] = "pretrain"
        sources: list[SourceSpec] = field(default_factory=list)
        packing: bool = True
        too_long: Literal["truncate", "drop"] = "truncate"  # SFT samples longer than seq_len + 1 tokens
        sft_format: Literal["auto", "chat", "gsm8k"] = "auto"
        shuffle_seed: int = 0  # SFT: per-epoch sample order
        chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"enable_thinking": False}

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: TitanTokenizer, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = 1):
        if config.kind == "sft":
            samples = SFTSamples(config.sources, tokenizer.qwen, seq_len, too_long=config.too_long,
                                 sft_format=config.sft_format, template_kwargs=config.chat_template_kwargs)
            dataset = SFTWindows(samples, seq_len, dp_rank, dp_world_size, packing=config.packing,
                                 seed=config.shuffle_seed)
        else:
            sources = [ShardedRecords(open_reader(spec, (spec.text_field,)), dp_rank, dp_world_size)
                       for spec in config.sources]
            dataset = PretrainWindows(sources, tokenizer.qwen, seq_len, packing=config.packing)
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size,
                         collate_fn=collate, num_workers=config.num_workers,
                         pin_memory=config.pin_memory, persistent_workers=config.persistent_workers,
                         prefetch_factor=config.prefetch_factor, snapshot_every_n_steps=snapshot_every_n_steps)
