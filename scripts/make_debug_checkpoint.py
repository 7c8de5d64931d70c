"""Write a randomly initialised HF directory (config, safetensors, byte-level tokenizer) for a small flavor.

    python scripts/make_debug_checkpoint.py OUT_DIR [--flavor debug] [--seed 0]

The tokenizer maps each byte to one token (256 ids) plus Qwen's special tokens, so any text round-trips;
it exists to exercise the CLI end to end without downloading anything.
"""

import argparse
from pathlib import Path

import torch

import qwen35
from torchtitan_ext.debug_assets import byte_level_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = qwen35.Qwen35Config.from_flavor(args.flavor, eos_token_id=0)  # <|endoftext|>
    model = qwen35.Qwen35ForCausalLM(config)
    qwen35.save_pretrained(model, args.out_dir)
    byte_level_tokenizer().save(str(args.out_dir / "tokenizer.json"))
    print(f"wrote {args.flavor} ({model.num_parameters():,} parameters, random weights) to {args.out_dir}")


if __name__ == "__main__":
    main()
