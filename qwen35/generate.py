"""Decoding: prefill with the chunked delta rule, then one-token steps with the recurrent rule on a preallocated cache.

CLI: python -m qwen35.generate --model <hf dir> --prompt "..." [--chat] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .cache import Qwen35Cache
from .model import Qwen35ForCausalLM


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """logits [B, V] -> token ids [B]. temperature 0 is greedy; otherwise nucleus sampling over the smallest set
    of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass before it is below top_p (the top token is always kept)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Qwen35ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
             padding_mask: torch.Tensor | None = None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Greedy (default) or temperature/top-p sampling. input_ids [B, T], left-padded when padding_mask [B, T]
    (1 = token) is given. Returns [B, T + n] with the prompt; sequences that hit EOS are filled with
    pad_token_id (default: the first EOS id) until all are done. `on_token` receives each step's tokens [B]."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    eos = _eos_set(model.config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else min(eos, default=0)
    B, T = input_ids.shape
    device = input_ids.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    dtype = model.lm_head.weight.dtype
    cache = Qwen35Cache(model.config, B, T + max_new_tokens, dtype, device)
    eos_ids = torch.tensor(sorted(eos), device=device, dtype=input_ids.dtype)
    step_mask = None if padding_mask is None else torch.ones(B, 1, dtype=padding_mask.dtype, device=device)

    logits = model(input_ids, padding_mask=padding_mask, cache=cache, num_logits_to_keep=1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = [input_ids]
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        finished |= torch.isin(token, eos_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], padding_mask=step_mask, cache=cache, num_logits_to_keep=1)
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------------- CLI

def load_chat_template(model_dir: Path) -> str:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    raise FileNotFoundError(f"--chat needs a chat template: no {jinja} and no 'chat_template' in {config}")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    import jinja2

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


def main(argv: list[str] | None = None) -> None:
    from tokenizers import Tokenizer

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
    args = parser.parse_args(argv)

    tokenizer_file = args.model / "tokenizer.json"
    if not tokenizer_file.exists():
        parser.error(f"no tokenizer at {tokenizer_file}")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    model = load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()

    eos = _eos_set(model.config.eos_token_id)
    prompt = args.prompt
    if args.chat:
        prompt = render_chat(load_chat_template(args.model), [{"role": "user", "content": args.prompt}])
        im_end = tokenizer.token_to_id("<|im_end|>")
        if im_end is not None:
            eos.add(im_end)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
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
    start = time.perf_counter()
    generate(model, input_ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
             eos_token_id=sorted(eos), on_token=stream)
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{len(generated)} tokens in {elapsed:.2f} s: {len(generated) / elapsed:.1f} tokens/s, "
          f"prompt {len(ids)} tokens]", file=sys.stderr)


if __name__ == "__main__":
    main()
