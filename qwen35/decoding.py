"""Decoding: prefill with the chunked delta rule, then one-token steps with the recurrent rule on a preallocated
cache. The command-line front end is `python -m qwen35.generate`."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from .cache import Qwen35Cache
from .model import Qwen35ForCausalLM


def eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


_compiled_steps: "weakref.WeakKeyDictionary[Qwen35ForCausalLM, Callable]" = weakref.WeakKeyDictionary()


def compiled_decode_step(model: Qwen35ForCausalLM) -> Callable:
    """The model compiled once (fullgraph, dynamic cache length) for one-token steps; reused across calls."""
    if model not in _compiled_steps:
        _compiled_steps[model] = torch.compile(model, fullgraph=True, dynamic=True)
    return _compiled_steps[model]


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
             on_token: Callable[[torch.Tensor], None] | None = None, compile: bool = False) -> torch.Tensor:
    """Greedy (default) or temperature/top-p sampling. input_ids [B, T], left-padded when padding_mask [B, T]
    (1 = token) is given. Returns [B, T + n] with the prompt; sequences that hit EOS are filled with
    pad_token_id (default: the first EOS id) until all are done. `on_token` receives each step's tokens [B].
    compile: run the one-token steps through torch.compile (one-time compile cost; removes per-op overhead)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    eos = eos_set(model.config.eos_token_id if eos_token_id is None else eos_token_id)
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
    decode = compiled_decode_step(model) if compile else model
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
        logits = decode(token[:, None], padding_mask=step_mask, cache=cache, num_logits_to_keep=1)
    return torch.cat(out, dim=1)
