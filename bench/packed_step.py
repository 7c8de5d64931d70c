"""Packed training step, previous vs new: dense [T, T] attention mask + full [T, vocab] logits, against
per-document attention + the chunked linear cross entropy (the trainer's default). Time and peak memory.

    python bench/packed_step.py [--docs 4 --doc-len 4096] [--chunk-size 1024] [--threads 2]
    python bench/packed_step.py --attention-only --docs 4 --doc-len 4096     # one attention call, fwd + bwd
    python bench/packed_step.py --device cuda --flavor 0.8B --dtype bfloat16 --compile   # + tokens/s, MFU

A step is the trainer's forward, loss (`torchtitan_ext.loss.Qwen35Loss`, summed cross entropy / valid tokens)
and backward on one packed row of `docs x doc-len` tokens (no optimizer: its memory and time are the same for
both). "previous": `packed_attention = "dense"`, `chunk_size = None`; "new": `packed_attention = "auto"` (CPU: the
per-document flash op; CUDA: flex_attention with a document block mask), `chunk_size` as given.
--flavor thin (default): hidden 256, 2 layers (Gated DeltaNet, attention), vocab 248,320, tied embeddings.
--compile: torch.compile(fullgraph=True) per block, as the trainer's `[compile]` does.

Each variant runs in its own process, so peak memory is its own: on CPU the RSS high-water mark minus the RSS
before the measured steps (the model and its gradients are allocated by then); on CUDA max_memory_allocated
minus memory_allocated before the steps. Times: median over --repeats steps after --warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
import torch
import torch.nn.functional as F

from parallelism import ParallelDims, ParallelizeSettings, parallelize
from qwen35 import Qwen35Config
from qwen35.attention import PackedDocuments, document_block_mask, packed_document_attention
from qwen35.model import packed_document_ids_and_positions, packed_positions_and_mask
from torchtitan.tools.utils import get_peak_flops
from torchtitan_ext.flops import flops_per_token
from torchtitan_ext.loss import Qwen35Loss
from torchtitan_ext.model import Qwen35TitanModel

THIN = dict(hidden_size=256, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
            num_attention_heads=2, num_key_value_heads=1, head_dim=256, linear_num_key_heads=2,
            linear_num_value_heads=2, linear_key_head_dim=128, linear_value_head_dim=128, intermediate_size=512,
            vocab_size=248320, tie_word_embeddings=True, max_position_embeddings=32768)


def _memory_mark(device: torch.device) -> int:
    """Bytes in use now (CUDA: allocated; CPU: resident set)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_since(device: torch.device, mark: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - mark
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - mark


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, int]:
    """(median seconds per call, peak bytes above the memory in use before the timed calls)."""
    for _ in range(warmup):
        fn()
    mark = _memory_mark(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak_since(device, mark)


def _cu_seqlens(args, device) -> torch.Tensor:
    return torch.arange(0, (args.docs + 1) * args.doc_len, args.doc_len, dtype=torch.int32, device=device)


def run_step(args, variant: str) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = (Qwen35Config(**THIN) if args.flavor == "thin" else Qwen35Config.from_flavor(args.flavor))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen35TitanModel(Qwen35TitanModel.Config(flavor=args.flavor, architecture=config))
    model.to(dtype).train()
    if args.compile:
        parallelize(model, ParallelDims(world_size=1), None, ParallelizeSettings(compile=True))
    model.packed_attention = "dense" if variant == "previous" else "auto"
    loss_fn = Qwen35Loss.Config(chunk_size=None if variant == "previous" else args.chunk_size).build()
    tokens = args.docs * args.doc_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=g).to(device)
    labels = torch.randint(0, config.vocab_size, (1, tokens), generator=g).to(device)
    cu_seqlens = _cu_seqlens(args, device)

    def step():
        loss, _ = loss_fn(model(ids, cu_seqlens=cu_seqlens), labels, torch.tensor(tokens, device=device))
        loss.backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the peak is the step's own
        return loss

    step()  # allocates the gradients before the memory mark
    seconds, peak = _timed(step, device, args.warmup, args.repeats)
    result = dict(variant=variant, seconds=seconds, peak_bytes=peak, tokens_per_s=tokens / seconds,
                  loss=step().item())
    if device.type == "cuda":
        flops = flops_per_token(model, config, args.doc_len).total
        result["mfu"] = flops * tokens / seconds / get_peak_flops(torch.cuda.get_device_name())
    return result


def run_attention(args, variant: str) -> dict:
    """One attention call over the packed row (fwd + bwd) with --heads query / key-value heads of --head-dim."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tokens = args.docs * args.doc_len
    cu_seqlens = _cu_seqlens(args, device)
    g = torch.Generator().manual_seed(0)
    q_heads, kv_heads = map(int, args.heads.split(","))
    q, k, v = (torch.randn(1, heads, tokens, args.head_dim, generator=g).to(device, dtype).requires_grad_()
               for heads in (q_heads, kv_heads, kv_heads))
    if variant == "previous":
        _, mask = packed_positions_and_mask(cu_seqlens, tokens)
        attend = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
    else:
        doc, _ = packed_document_ids_and_positions(cu_seqlens, tokens)
        documents = document_block_mask(doc) if device.type == "cuda" else PackedDocuments(cu_seqlens)
        attend = lambda: packed_document_attention(q, k, v, documents)  # noqa: E731

    def step():
        attend().sum().backward()
        for t in (q, k, v):
            t.grad = None

    seconds, peak = _timed(step, device, args.warmup, args.repeats)
    return dict(variant=variant, seconds=seconds, peak_bytes=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flavor", default="thin", help="thin (see above) or a Qwen3.5 flavor, e.g. 0.8B")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--doc-len", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention-only", action="store_true")
    parser.add_argument("--heads", default="8,2", help="--attention-only: query,key-value heads (0.8B: 8,2)")
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--variants", default="previous,new")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps((run_attention if args.attention_only else run_step)(args, args.child)))
        return

    what = (f"attention fwd+bwd (heads {args.heads}, head_dim {args.head_dim})" if args.attention_only
            else f"{args.flavor} training step")
    print(f"{what}, {args.docs} x {args.doc_len} tokens packed, {args.device} {args.dtype}, "
          f"chunk {args.chunk_size}, compile={args.compile}, threads {args.threads}")
    results = {}
    for variant in args.variants.split(","):
        child = subprocess.run([sys.executable, *sys.argv, "--child", variant], capture_output=True, text=True)
        if child.returncode:
            print(f"{variant}: failed\n{child.stderr[-3000:]}")
            continue
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
        r = results[variant]
        extra = "".join(f", {key} {r[key]:.4g}" for key in ("tokens_per_s", "mfu", "loss") if key in r)
        print(f"{variant:>9}: {r['seconds']:.3f} s, peak +{r['peak_bytes'] / 2**30:.2f} GiB{extra}")
    if len(results) == 2:
        old, new = results["previous"], results["new"]
        print(f"new / previous: time {new['seconds'] / old['seconds']:.2f}x, "
              f"peak memory {new['peak_bytes'] / old['peak_bytes']:.3f}x "
              f"({old['peak_bytes'] / new['peak_bytes']:.1f}x lower)")


if __name__ == "__main__":
    main()
