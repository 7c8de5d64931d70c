"""`python -m torchtitan_ext.export_hf --config <toml> --checkpoint <dcp step dir> --output <hf dir>
[--layout text|published --source <original hf dir>] [--dtype bfloat16|float32]`:
a torchtitan DCP checkpoint (full or model-only) -> an HF directory transformers loads. Text layout: config.json,
safetensors, and the tokenizer files and chat template of [model] hf_assets_path. Published layout: the
multimodal directory of --source with the trained decoder and MTP head (`qwen35.hf_io.save_published`)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
import torch
import torch.distributed.checkpoint as dcp

import qwen35
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.hf_io import save_published
from qwen35.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

from .toml_config import ConfigError, read_sections

TIED_LM_HEAD = "lm_head.weight"


def load_dcp_model(architecture: Qwen35Config, checkpoint: Path) -> Qwen35ForCausalLM:
    """The model weights of a torchtitan checkpoint (stored under our = HF text-model names)."""
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a DCP checkpoint directory (no .metadata)")
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    model = Qwen35ForCausalLM(architecture)
    state = model.state_dict()
    if architecture.tie_word_embeddings and TIED_LM_HEAD not in stored:
        state.pop(TIED_LM_HEAD)
    missing = sorted(set(state) - set(stored))
    if missing:
        raise ValueError(f"{checkpoint}: checkpoint lacks {len(missing)} model tensor(s), first {missing[0]!r}; "
                         f"is it a checkpoint of a different flavor?")
    for key, meta in ((k, stored[k]) for k in state):
        if tuple(meta.size) != tuple(state[key].shape):
            raise ValueError(f"{checkpoint}: tensor {key!r} has shape {tuple(meta.size)}, the model expects "
                             f"{tuple(state[key].shape)}")
    dcp.load(state, checkpoint_id=str(checkpoint))  # fills `state` in place (without a process group)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_ext.export_hf", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the training TOML (flavor, hf_assets_path)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a step-N directory of a DCP checkpoint")
    parser.add_argument("--output", required=True, type=Path, help="HF directory to write")
    parser.add_argument("--layout", choices=["text", "published"], default="text",
                        help="text: a Qwen3_5ForCausalLM directory; published: the multimodal layout of --source "
                             "(its vision tower, config and files kept, the trained text decoder and MTP head)")
    parser.add_argument("--source", type=Path, help="--layout published: the original HF directory")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="tensor dtype (default: the source's for published, float32 for text)")
    args = parser.parse_args(argv)
    if (args.layout == "published") != (args.source is not None):
        parser.error("--source <original HF dir> is required by --layout published, and only by it")
    try:
        model_section = read_sections(args.config, [])["model"]
    except ConfigError as err:
        sys.exit(f"error: {err}")
    model = load_dcp_model(model_section.architecture(), args.checkpoint)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.layout == "published":
        try:
            save_published(model, args.output, args.source, dtype=dtype)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        print(f"wrote {args.output}")
        return
    with torch.no_grad():
        qwen35.save_pretrained(model.to(dtype) if dtype else model, args.output)
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE):
        source = Path(model_section.hf_assets_path) / name
        if source.is_file():
            shutil.copyfile(source, args.output / name)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
