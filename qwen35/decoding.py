"""Decoding: prefill with the chunked delta rule, then one-token steps with the recurrent rule on a preallocated
cache. The command-line front end is `python -m qwen35.generate`."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import Qwen35Cache
from .gated_deltanet import traces_recurrent_step
from .model import Qwen35ForCausalLM, call_layer
from .mtp import mtp_layer_config


def eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


# Decode steps on CPU are compiled by default only when this many of them amortise the compile: ~25 s in a fresh
# process on the 2-core CI machine, saving ~4.3 ms per step at hidden 512 x 8 layers (BENCHMARKS.md, #17).
CPU_COMPILE_MIN_STEPS = 4096

# One traced and compiled subgraph per layer kind, reused by every layer inside a compiled step, so that the
# step's compile time barely grows with depth.
_layer_region = torch.compiler.nested_compile_region(call_layer)
_compiled: dict[tuple[Callable, str], Callable] = {}


def decode_compile_unsupported(model: Qwen35ForCausalLM) -> str | None:
    """Why the decode step of `model` cannot be compiled, or None."""
    dtype = model.lm_head.weight.dtype
    if model.config.is_moe and dtype != torch.bfloat16:
        return (f"an MoE model in {dtype} cannot be compiled: the experts' torch._grouped_mm has a fake kernel for "
                "bfloat16 only; load the model in bfloat16 or decode with compile=False")
    return None


def compile_pays(model: Qwen35ForCausalLM, device: torch.device | str, decode_steps: int) -> bool:
    """Whether compiling the decode step pays for `decode_steps` steps in this process: always on CUDA (where the
    step runs as CUDA graphs), on CPU from CPU_COMPILE_MIN_STEPS steps; never where it cannot compile
    (`decode_compile_unsupported`). The default of `generate(compile=None)` (with its max_new_tokens) and of
    `torchtitan_ext.eval_gsm8k` (with all its batches' steps)."""
    if decode_compile_unsupported(model) is not None:
        return False
    return torch.device(device).type == "cuda" or decode_steps >= CPU_COMPILE_MIN_STEPS


def _compiled_for(fn: Callable, device: torch.device | str, cuda_graphs: bool) -> Callable:
    """fn compiled (fullgraph) once per process and device kind; on CUDA as CUDA graphs if cuda_graphs."""
    key = (fn, torch.device(device).type)
    if key not in _compiled:
        mode = "reduce-overhead" if cuda_graphs and key[1] == "cuda" else None
        _compiled[key] = torch.compile(fn, fullgraph=True, mode=mode)
    return _compiled[key]


def _forward_with_layer_regions(model: Qwen35ForCausalLM, *args, **kwargs):
    return model(*args, run_layer=_layer_region, **kwargs)


def compiled_decode_step(model: Qwen35ForCausalLM, cache: Qwen35Cache) -> Callable:
    """model's forward on `cache`, compiled. The model is a graph input, so the compiled code serves every model of
    the same shapes. The cache's shapes do not change from step to step (`qwen35.cache`); a new batch size or cache
    length recompiles once with those sizes symbolic (torch.compile's automatic dynamic shapes), then never again (a
    batch of one, whose size torch.compile specialises, has its own graphs).

    Where the one-token delta-rule update is traced into the graph (`traces_recurrent_step`: CPU), the whole step
    is one graph: embedding, mask, positions, the layers as nested compile regions, final norm and lm_head (its
    first steps recompile once more, with the cache length symbolic). Elsewhere (CUDA) the step calls the in-place
    op, which torch does not functionalize inside a nested compile region (torch 2.13: "Found a custom (non-ATen)
    operator whose output has alias annotations"), and inlining every layer would make the compile grow with
    depth: so each decoder layer is one compiled call, one graph per layer kind, run as CUDA graphs (mode
    "reduce-overhead"), with the cache's buffers at static addresses and each call starting a new graph step."""
    device = cache.valid.device
    if traces_recurrent_step(device):
        return functools.partial(_compiled_for(_forward_with_layer_regions, device, cuda_graphs=False), model)
    step = functools.partial(model, run_layer=_compiled_for(call_layer, device, cuda_graphs=True))
    if device.type != "cuda":
        return step
    for buffer in cache.buffers():
        torch._dynamo.mark_static_address(buffer)

    def cuda_graph_step(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return step(*args, **kwargs)

    return cuda_graph_step


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


@dataclass
class SpeculationStats:
    """Filled by `generate(..., speculative="mtp", stats=...)`: drafts made and accepted (per row), two-token
    verification steps run, positions generated (the output's new columns) and the wall time of the decoding."""
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class _Output:
    """Generated tokens per row. Rows may advance by different counts per step (speculation); a position is
    complete once every row has its token, and is then passed to `on_token`. Rows that hit EOS are filled with
    pad_token_id afterwards; generation is over when every row is finished or has max_new_tokens tokens."""

    def __init__(self, input_ids, max_new_tokens, eos, pad_token_id, on_token):
        self.input_ids, self.max_new_tokens, self.on_token = input_ids, max_new_tokens, on_token
        self.pad_token_id = pad_token_id
        B = input_ids.shape[0]
        self.rows: list[list[int]] = [[] for _ in range(B)]
        self.eos_ids = torch.tensor(sorted(eos), device=input_ids.device, dtype=input_ids.dtype)
        self.finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        self.streamed = 0

    def append(self, token: torch.Tensor, rows: torch.Tensor | None = None) -> bool:
        """Record one token [B] for every row (or for the rows where `rows` is True); True when generation is
        over."""
        token = torch.where(self.finished, torch.full_like(token, self.pad_token_id), token)
        if rows is None:
            rows = torch.ones_like(self.finished)
        for b in rows.nonzero().flatten().tolist():
            self.rows[b].append(int(token[b]))
        self.finished |= torch.isin(token, self.eos_ids) & rows
        complete = min(len(r) for r in self.rows)
        for position in range(self.streamed, min(complete, self.max_new_tokens)):
            if self.on_token is not None:
                self.on_token(torch.tensor([r[position] for r in self.rows], device=token.device))
        self.streamed = max(self.streamed, min(complete, self.max_new_tokens))
        return bool(self.finished.all()) or complete >= self.max_new_tokens

    def result(self) -> torch.Tensor:
        """[B, T + n]: n is where plain decoding stops (the last row's EOS, at most max_new_tokens)."""
        longest = max(len(r) for r in self.rows)
        n = min(longest, self.max_new_tokens)
        if self.eos_ids.numel():
            eos = set(self.eos_ids.tolist())
            ends = [next((i + 1 for i, t in enumerate(r) if t in eos), None) for r in self.rows]
            if all(e is not None for e in ends):
                n = min(n, max(ends))
        new = torch.tensor([r[:n] for r in self.rows], dtype=self.input_ids.dtype, device=self.input_ids.device)
        return torch.cat([self.input_ids, new.view(len(self.rows), n)], dim=1)


@torch.no_grad()
def generate(model: Qwen35ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
             padding_mask: torch.Tensor | None = None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, compile: bool | None = None,
             speculative: str | None = None, stats: SpeculationStats | None = None) -> torch.Tensor:
    """Greedy (default) or temperature/top-p sampling. input_ids [B, T], left-padded when padding_mask [B, T]
    (1 = token) is given. Returns [B, T + n] with the prompt; sequences that hit EOS are filled with
    pad_token_id (default: the first EOS id) until all are done. `on_token` receives each step's tokens [B].
    compile: run the decode steps (after the eager prefill) compiled (`compiled_decode_step`; a one-time compile
    per process removes the per-op overhead); None (default) decides by `compile_pays`.
    speculative="mtp" (greedy only): the model's MTP head drafts one token that the main model verifies with
    the next one in a single two-token step; the output is the plain greedy output. `stats` (a
    `SpeculationStats`) receives the acceptance counts."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    if speculative and temperature != 0:
        raise ValueError("speculative='mtp' implements greedy decoding only: use temperature=0")
    if speculative and model.mtp is None:
        raise ValueError("speculative='mtp' needs a model with an MTP head (config.mtp_num_hidden_layers = 1; "
                         "the checkpoint's mtp.* tensors)")
    eos = eos_set(model.config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else min(eos, default=0)
    B, T = input_ids.shape
    device = input_ids.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    dtype = model.lm_head.weight.dtype
    # speculation may leave a hole (a rejected draft's position) per generated token
    cache = Qwen35Cache(model.config, B, T + (2 if speculative else 1) * max_new_tokens + 1, dtype, device)
    output = _Output(input_ids, max_new_tokens, eos, pad_token_id, on_token)
    if speculative:
        cache.record_steps(2)  # the verification steps (prefill, on an uninitialised cache, is not recorded)
    if compile is None:
        compile = compile_pays(model, device, max_new_tokens)
    elif compile and (reason := decode_compile_unsupported(model)) is not None:
        raise ValueError(f"compile=True: {reason}")
    decode = compiled_decode_step(model, cache) if compile else model
    if max_new_tokens <= 0:
        return output.result()
    if speculative:
        stats = stats if stats is not None else SpeculationStats()
        _generate_mtp_speculative(model, decode, compile, input_ids, padding_mask, cache, output, stats)
        result = output.result()
        stats.new_tokens += result.shape[1] - T
        return result

    step_mask = None if padding_mask is None else torch.ones(B, 1, dtype=padding_mask.dtype, device=device)
    logits = model(input_ids, padding_mask=padding_mask, cache=cache, num_logits_to_keep=1)
    while True:
        token = sample_next(logits[:, -1], temperature, top_p, generator)
        token = torch.where(output.finished, torch.full_like(token, pad_token_id), token)
        if output.append(token):
            return output.result()
        logits = decode(token[:, None], padding_mask=step_mask, cache=cache, num_logits_to_keep=1)


def _mtp_draft(model: Qwen35ForCausalLM, hidden: torch.Tensor, next_tokens: torch.Tensor, mtp_cache: Qwen35Cache,
               padding_mask: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Run the MTP head on the next positions (main hidden states [B, n, H] and the tokens that follow them
    [B, n]; padding_mask [B, n] marks padding and holes) on its own cache; return its greedy draft [B] for the
    token after row b's last kept position (kept[b], default n)."""
    n = next_tokens.shape[1]
    past = mtp_cache.valid[:, :mtp_cache.length].sum(-1, keepdim=True)
    positions = (padding_mask.long().cumsum(-1) - 1 + past).clamp(min=0)
    attn_mask = mtp_cache.attention_mask(padding_mask, n)
    cos, sin = model.model.rotary_emb(positions, hidden.dtype)
    out, _ = model.mtp(hidden, model.model.embed_tokens(next_tokens), cos, sin, attn_mask=attn_mask, cache=mtp_cache)
    if kept is not None:
        out = out.gather(1, (kept - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1]))
    return model.lm_head(out[:, -1]).argmax(-1)


def _generate_mtp_speculative(model, decode, compile: bool, input_ids, padding_mask, cache, output: _Output,
                              stats: SpeculationStats) -> None:
    """Greedy decoding with the MTP head as a one-token drafter, every row at its own pace.

    Invariant at the top of the loop: the main cache holds every position before `last` (each row's newest
    greedy token), the MTP cache holds the same positions, and `draft` is the head's guess for the token after
    `last`. One recorded two-token step [last, draft] gives the greedy token after `last` (y1) and, where
    draft == y1, the one after it (y2). A row that rejects keeps one position: its second one becomes a hole
    (skipped by attention and positions, like left padding) and its Gated DeltaNet conv window and state return
    to their values after `last`, kept by the token-by-token recorded step. So every kept state is exactly one of
    plain decoding. compile: the drafts after the prefill's run as one compiled graph each (without CUDA graphs,
    which would have to alternate with the verification step's)."""
    start = time.perf_counter()
    B = input_ids.shape[0]
    device = input_ids.device
    mtp_cache = Qwen35Cache(mtp_layer_config(model.config), B, cache.max_length, model.lm_head.weight.dtype, device)
    if padding_mask is None:
        padding_mask = torch.ones_like(input_ids)
    ones = torch.ones(B, 2, dtype=padding_mask.dtype, device=device)
    draft_next = _compiled_for(_mtp_draft, device, cuda_graphs=False) if compile else _mtp_draft
    logits, hidden = model(input_ids, padding_mask=padding_mask, cache=cache, num_logits_to_keep=1,
                           output="logits_and_hidden")
    last = logits[:, -1].argmax(-1)
    done = output.append(last)
    if not done:
        draft = _mtp_draft(model, hidden, torch.cat([input_ids[:, 1:], last[:, None]], 1), mtp_cache,
                           padding_mask)
    while not done:
        logits, hidden = decode(torch.stack([last, draft], 1), padding_mask=ones, cache=cache,
                                output="logits_and_hidden")
        stats.verify_steps += 1
        y1, y2 = logits.argmax(-1).unbind(1)
        accepted = y1 == draft
        live = ~output.finished
        stats.drafted += int(live.sum())
        stats.accepted += int((accepted & live).sum())
        kept = 1 + accepted.long()
        cache.keep_positions(kept, 2)
        output.append(y1)
        done = output.append(y2, rows=accepted)
        if not done:
            kept_mask = torch.stack([torch.ones_like(accepted), accepted], 1).to(padding_mask.dtype)
            draft = draft_next(model, hidden, torch.stack([y1, y2], 1), mtp_cache, kept_mask, kept)
            last = torch.where(accepted, y2, y1)
    stats.seconds += time.perf_counter() - start
