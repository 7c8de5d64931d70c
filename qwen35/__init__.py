"""Qwen3.5 as a plain PyTorch library: config, hybrid decoder (dense + MoE), HF import/export, decoding."""

import importlib
from pathlib import Path

# Our `kernels` package shares its import name with HF's kernel-hub package; refuse to run on the wrong one.
_kernels = importlib.import_module("kernels")
if getattr(_kernels, "__file__", None) is None or \
        Path(_kernels.__file__).resolve().parent.parent != Path(__file__).resolve().parent.parent:
    raise ImportError(
        f"`import kernels` resolved to {getattr(_kernels, '__file__', None) or _kernels!r}, not this project's "
        f"kernels package (expected beside {Path(__file__).resolve().parent}). Another distribution named "
        "'kernels' (e.g. HF's kernel hub) shadows it: uninstall it or fix sys.path.")

from .cache import Qwen35Cache  # noqa: E402
from .config import FLAVORS, Qwen35Config  # noqa: E402
from .decoding import generate  # noqa: E402
from .hf_io import load_pretrained, save_pretrained  # noqa: E402
from .model import Qwen35ForCausalLM  # noqa: E402

__all__ = ["FLAVORS", "Qwen35Cache", "Qwen35Config", "Qwen35ForCausalLM", "generate", "load_pretrained",
           "save_pretrained"]
