"""Training data: record sources (sources.py), packed pretraining windows (pretrain.py), chat SFT with loss
masking (sft.py), the padding both apply to a short window (windows.py), and the torchtitan tokenizer / dataloader /
collation (loader.py)."""

from .loader import Qwen35DataLoader, TitanTokenizer, collate
from .sources import FORMATS, DataError, SourceSpec

__all__ = ["FORMATS", "DataError", "Qwen35DataLoader", "SourceSpec", "TitanTokenizer", "collate"]
