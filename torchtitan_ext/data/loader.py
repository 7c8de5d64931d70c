"""The torchtitan side of the data pipeline: the tokenizer torchtitan builds, the dataloader it builds, and the
collation of a batch of windows into the packed row the qwen35 model takes.

A batch of B windows [T] becomes one row [1, B * T] with `cu_seqlens` (int32) holding every document / sample /
padding start of every window and the end, so the model's positions, conv windows, delta-rule states and
attention all restart at each boundary.

The dataloader state in torchtitan's checkpoints is one global read position for all data-parallel ranks (the
ranks' states gathered and merged when the checkpoint is saved, identical on every rank), with a fingerprint of every
data file: a checkpoint from W ranks resumes on any number of ranks, and a data file changed since is refused.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer

from .pretrain import PretrainWindows
from .sft import SFTSamples, SFTWindows
from .sources import DataError, SourceSpec, SourceStream, check_fingerprints, open_reader, source_fingerprints


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
        shuffle: bool = True  # pretraining: units and their records in a seeded order (else in reading order)
        shuffle_seed: int = 0  # pretraining: the order of units and records; SFT: per-epoch sample order
        chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"enable_thinking": False}

    STATE_KEY = "global_data_position"

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: TitanTokenizer, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = 1):
        if config.num_workers:
            raise DataError(f"dataloader.num_workers = {config.num_workers}: must be 0; the data is read and "
                            "tokenized (on all cores) in the training process, which saves its position")
        self.kind = config.kind
        self.fingerprints = source_fingerprints(config.sources)
        if config.kind == "sft":
            samples = SFTSamples(config.sources, tokenizer.qwen, seq_len, too_long=config.too_long,
                                 sft_format=config.sft_format, template_kwargs=config.chat_template_kwargs)
            dataset = SFTWindows(samples, seq_len, dp_rank, dp_world_size, packing=config.packing,
                                 seed=config.shuffle_seed)
        else:
            seed = config.shuffle_seed if config.shuffle else None
            sources = [SourceStream(open_reader(spec, (spec.text_field,)), dp_rank, dp_world_size, seed)
                       for spec in config.sources]
            dataset = PretrainWindows(sources, tokenizer.qwen, seq_len, packing=config.packing)
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size,
                         collate_fn=collate, num_workers=0, pin_memory=config.pin_memory,
                         snapshot_every_n_steps=snapshot_every_n_steps)

    def _rank_states(self) -> list[dict[str, Any]]:
        """Every data-parallel rank's `rank_state`, gathered over all processes (ranks that differ only in TP, PP
        or CP hold the same state); called collectively, as checkpoint saves and loads are."""
        state = self.dataset.rank_state()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            if self.dp_world_size != 1:
                raise RuntimeError(f"data-parallel rank {self.dp_rank} of {self.dp_world_size} without a process "
                                   "group: the ranks' read states cannot be gathered")
            return [state]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.dp_rank, state))
        by_rank = dict(gathered)
        return [by_rank[rank] for rank in range(self.dp_world_size)]

    def state_dict(self) -> dict[str, Any]:
        position = {"kind": self.kind, "fingerprints": self.fingerprints,
                    "data": self.dataset.merge_rank_states(self._rank_states())}
        return {self.STATE_KEY: pickle.dumps(position)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:  # torchtitan's convention: nothing saved, start from the beginning
            return
        if self.STATE_KEY not in state_dict:
            raise DataError(f"the checkpoint's dataloader state has no {self.STATE_KEY!r} (keys: "
                            f"{', '.join(state_dict)}); it was saved by an older version: start the data afresh with "
                            "--checkpoint.exclude_from_loading dataloader")
        saved = pickle.loads(state_dict[self.STATE_KEY])
        if saved["kind"] != self.kind:
            raise DataError(f"the checkpoint's data position is for dataloader.kind = {saved['kind']!r}, the config "
                            f"has {self.kind!r}")
        check_fingerprints(saved["fingerprints"], self.fingerprints)
        self.dataset.load_global_state(saved["data"])
