"""`python -m torchtitan_ext.export_hf --config <toml> --checkpoint <dcp step dir> --output <hf dir>
[--layout text|published --source <original hf dir>] [--dtype bfloat16|float32] [--overwrite]`:
a torchtitan DCP checkpoint (full or model-only) -> an HF directory transformers loads. Text layout: config.json,
safetensors, and the tokenizer files and chat template of [model] hf_assets_path. Published layout: the
multimodal directory of --source with the trained decoder and MTP head (`qwen35.hf_io.save_published`).

The output is written to a temporary directory beside it and renamed into place when complete; a non-empty
output directory is refused unless --overwrite is given (then it is replaced as a whole).
Security: DCP reads the checkpoint's .metadata with pickle, which can run code: export only checkpoints from a
trusted source."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import qwen35
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.hf_io import save_published
from qwen35.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

from . import compat
from .checkpoint import CheckpointError, check_complete

TIED_LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


class ExportError(ValueError):
    """The checkpoint does not fit the config, or the output cannot be written as asked."""


def load_dcp_model(architecture: Qwen35Config, checkpoint: Path) -> Qwen35ForCausalLM:
    """The model weights of a torchtitan checkpoint (stored under our = HF text-model names)."""
    stored = check_complete(checkpoint).state_dict_metadata
    model = Qwen35ForCausalLM(architecture)
    state = model.state_dict()
    if architecture.tie_word_embeddings and TIED_LM_HEAD not in stored:
        state.pop(TIED_LM_HEAD)
    missing = sorted(set(state) - set(stored))
    if missing:
        raise ExportError(f"{checkpoint}: checkpoint lacks {len(missing)} model tensor(s), first {missing[0]!r}; "
                         f"is it a checkpoint of a different flavor?")
    for key, meta in ((k, stored[k]) for k in state):
        if tuple(meta.size) != tuple(state[key].shape):
            raise ExportError(f"{checkpoint}: tensor {key!r} has shape {tuple(meta.size)}, the model expects "
                             f"{tuple(state[key].shape)}")
    if architecture.tie_word_embeddings and TIED_LM_HEAD in stored:
        state[TIED_LM_HEAD] = torch.empty_like(state[EMBEDDING])  # its own buffer, to compare after loading
    dcp.load(state, checkpoint_id=str(checkpoint))  # fills `state` in place (without a process group)
    if architecture.tie_word_embeddings and TIED_LM_HEAD in state \
            and not torch.equal(state[TIED_LM_HEAD], state[EMBEDDING]):
        raise ExportError(f"{checkpoint}: the config ties lm_head to embed_tokens (tie_word_embeddings = true), but "
                          f"the checkpoint's {TIED_LM_HEAD} differs from its {EMBEDDING}: it was trained untied, and "
                          "a tied export would drop the trained lm_head. Set [model] tie_word_embeddings = false in "
                          "the config")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def _check_output(output: Path, overwrite: bool, checkpoint: Path) -> None:
    """Refuse an output that would destroy user files or the checkpoint being exported."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file, not a directory")
    if checkpoint.resolve().is_relative_to(output.resolve()):
        raise ExportError(f"--output {output} contains --checkpoint {checkpoint}; write the export elsewhere")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"--output {output} is not empty; pass --overwrite to replace it (its current contents "
                          "are deleted)")


def _write_then_rename(output: Path, write: Callable[[Path], None]) -> None:
    """write(directory) into a temporary sibling of `output`, then put it in output's place: an interrupted or
    failed export leaves `output` as it was."""
    partial, previous = (output.with_name(f".{output.name}.{suffix}") for suffix in ("partial", "previous"))
    for leftover in (partial, previous):  # of an export killed before it could clean up
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write(partial)
        if output.is_dir():
            os.replace(output, previous)
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def _copy_tokenizer_files(hf_assets_path: Path, directory: Path) -> None:
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE):
        source = hf_assets_path / name
        if source.is_file():
            shutil.copyfile(source, directory / name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_ext.export_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the training TOML (flavor, hf_assets_path)")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a step-N directory of a DCP checkpoint (read with pickle: trusted sources only)")
    parser.add_argument("--output", required=True, type=Path, help="HF directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    parser.add_argument("--layout", choices=["text", "published"], default="text",
                        help="text: a Qwen3_5ForCausalLM directory; published: the multimodal layout of --source "
                             "(its vision tower, config and files kept, the trained text decoder and MTP head)")
    parser.add_argument("--source", type=Path, help="--layout published: the original HF directory")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="tensor dtype (default: the source's for published, float32 for text)")
    return parser


def main(argv: list[str] | None = None) -> None:
    compat.apply()  # before torchtitan's config classes are imported (.toml_config): torch 2.11 needs a shim
    from .toml_config import ConfigError, read_sections

    parser = _parser()
    args = parser.parse_args(argv)
    if (args.layout == "published") != (args.source is not None):
        parser.error("--source <original HF dir> is required by --layout published, and only by it")
    try:
        model_section = read_sections(args.config, [])["model"]
        _check_output(args.output, args.overwrite, args.checkpoint)
        model = load_dcp_model(model_section.architecture(), args.checkpoint)
        dtype = getattr(torch, args.dtype) if args.dtype else None

        def write(directory: Path) -> None:
            with torch.no_grad():
                if args.layout == "published":
                    save_published(model, directory, args.source, dtype=dtype)
                    return
                qwen35.save_pretrained(model.to(dtype) if dtype else model, directory)
            _copy_tokenizer_files(Path(model_section.hf_assets_path), directory)

        _write_then_rename(args.output, write)
    except (ConfigError, CheckpointError, ExportError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
