"""Generate text from an HF checkpoint directory, streaming tokens and reporting tokens/s.

    python -m qwen35.generate --model <hf dir> --prompt "..." [--chat] [--max-new-tokens N] [--speculative mtp]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch

from .decoding import CPU_COMPILE_MIN_STEPS, SpeculationStats, eos_set, generate
from .tokenizer import Qwen35Tokenizer


def main(argv: list[str] | None = None) -> None:
    from .hf_io import load_pretrained

    parser = argparse.ArgumentParser(prog="python -m qwen35.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="HF directory: config.json, safetensors, "
                        "tokenizer.json (+ chat_template.jinja or tokenizer_config.json for --chat)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled decode steps (default: where the compile pays: always on CUDA, on CPU from "
                        f"{CPU_COMPILE_MIN_STEPS} new tokens)")
    parser.add_argument("--speculative", choices=["mtp"], default=None,
                        help="greedy speculative decoding with the checkpoint's MTP head (same output as greedy)")
    args = parser.parse_args(argv)

    try:
        tokenizer = Qwen35Tokenizer.from_dir(args.model)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.speculative and args.temperature != 0:
        parser.error("--speculative mtp decodes greedily: use --temperature 0")
    model = load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
    if args.speculative and model.mtp is None:
        parser.error(f"--speculative mtp: {args.model} has no MTP head (no mtp.* tensors or "
                     "mtp_num_hidden_layers = 0 in config.json)")
    try:
        tokenizer.check_fits(model.config.vocab_size)
        prompt = args.prompt
        if args.chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                   add_generation_prompt=True)
    except ValueError as err:
        parser.error(f"{err}{' (--chat)' if args.chat else ''}")

    eos = eos_set(model.config.eos_token_id)
    if args.chat:
        eos.add(tokenizer.im_end_id)
    ids = tokenizer.encode(prompt)
    if not ids:
        parser.error("the prompt encodes to zero tokens")
    input_ids = torch.tensor([ids], device=args.device)

    generated: list[int] = []
    printed = ""

    def stream(token: torch.Tensor) -> None:
        nonlocal printed
        generated.append(int(token[0]))
        text = tokenizer.decode([t for t in generated if t not in eos])
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text

    sys.stdout.write(args.prompt if not args.chat else "")
    stats = SpeculationStats()
    start = time.perf_counter()
    generate(model, input_ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
             eos_token_id=sorted(eos), on_token=stream, compile=args.compile, speculative=args.speculative,
             stats=stats)
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    speculation = (f", MTP drafts accepted {stats.accepted}/{stats.drafted} ({stats.acceptance_rate:.0%})"
                   if args.speculative else "")
    print(f"[{len(generated)} tokens in {elapsed:.2f} s: {len(generated) / elapsed:.1f} tokens/s, "
          f"prompt {len(ids)} tokens{speculation}]", file=sys.stderr)


class _CallableModule(types.ModuleType):
    """Importing this submodule rebinds the package attribute `qwen35.generate` from the function to the module;
    keep `qwen35.generate(model, ids, ...)` working either way."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
