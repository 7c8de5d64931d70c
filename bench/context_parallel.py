"""Context parallelism on CPU (gloo): activation memory per rank vs sequence length at CP = 1, 2, 4, the bytes
each rank sends per layer and forward (the backward's reduce-scatters mirror them), and the attention work per rank
of the zig-zag layout against the consecutive one.

    python bench/context_parallel.py [--seq-lens 2048,4096,8192,16384] [--degrees 1,2,4] [--flavor debug]
        [--balance-only] [--timed-seq-len 8192]
    python bench/context_parallel.py --one-device-step cuda --flavor 0.8B --seq-lens 32768   # bench/gpu_session.sh

Attention balance: per rank, the query-key pairs its causal block-causal attention scores (FLOPs = 4 x heads x
head_dim x pairs forward), for the zig-zag layout (rank r holds chunks r and 2C - 1 - r of T / 2C tokens; ours)
and for consecutive slices of T / C (the previous layout, the peer), over a row of 4,096-token documents and over
one document filling the row; printed as the busiest rank's share over the mean (1.00 = balanced, C = all work on
one rank). Then the measured time of the CPU attention (the flash tiles, forward + backward, fp32, 0.8B's 8 query
and 2 key-value heads of 256) of each rank's queries, run one rank after another in this process: the busiest
rank's time over the mean, for both layouts.

Activation memory is the bytes of the distinct storages autograd saves for the backward during one forward of the
model (fp32, one packed row of documents of 4,096 tokens, the last one shorter), measured with
torch.autograd.graph.saved_tensors_hooks on every rank; the table prints the largest rank's and its ratio to CP = 1
(one process, no context parallelism: the peer). Communication is computed from the shapes of the all-gathers.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import qwen35  # noqa: E402
from qwen35.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from distributed_utils import run_distributed  # noqa: E402
from parallelism.context_parallel import (apply_context_parallel, attention_tiles, attention_work,  # noqa: E402
                                          chunks_of_rank, gathered_chunk_slot, tiled_attention)

DOCUMENT_LEN = 4096


def packed_boundaries(seq_len: int) -> torch.Tensor:
    return torch.tensor(sorted({*range(0, seq_len, DOCUMENT_LEN), seq_len}), dtype=torch.int32)


def saved_activation_bytes(forward):
    """(bytes of the distinct storages saved for the backward while `forward()` runs, its result)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(storages.values()), out


def measure(flavor: str, seq_lens: list[int]) -> list[int]:
    """Per sequence length: this rank's saved-activation bytes (under the default process group's context
    parallelism when there is one); the maximum over the ranks."""
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config.from_flavor(flavor))
    cp = apply_context_parallel(model, dist.group.WORLD) if dist.is_initialized() else None
    results = []
    for seq_len in seq_lens:
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
        cu = packed_boundaries(seq_len)
        if cp is None:
            nbytes, _ = saved_activation_bytes(lambda: model(ids, cu_seqlens=cu))
        else:
            shard = cp.shard(cu, seq_len)
            nbytes, _ = saved_activation_bytes(lambda: model(shard.take(ids), position_ids=shard.position_ids,
                                                             cu_seqlens=shard.cu_seqlens))
        if cp is not None:
            worst = torch.tensor(nbytes)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            nbytes = int(worst)
        results.append(nbytes)
    return results


def communication_table(config: qwen35.Qwen35Config, seq_len: int, degree: int, dtype_bytes: int) -> list[str]:
    """Bytes one rank sends per layer and forward (it receives degree - 1 times as much)."""
    local = seq_len // degree
    hv, k, v = config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim
    state = 2 * hv * k * (v + k) * 4  # [U | M] of each of the rank's two chunks, in fp32
    halo = 2 * (config.linear_conv_kernel_dim - 1) * config.conv_dim * dtype_bytes
    attention = 2 * local * config.num_key_value_heads * config.head_dim * dtype_bytes
    return [f"| {seq_len} | {degree} | {state / 2**10:.1f} KiB | {halo / 2**10:.2f} KiB | "
            f"{(state + halo) / 2**10:.1f} KiB | {attention / 2**20:.1f} MiB | {attention / (state + halo):.0f} |"]


def layouts(degree: int) -> dict[str, tuple[list[tuple[int, int]], object]]:
    """Per layout: each rank's chunks (of 2 x degree) and the slot of chunk c in its gathered keys."""
    return {"zig-zag": ([chunks_of_rank(r, degree) for r in range(degree)], lambda c: gathered_chunk_slot(c, degree)),
            "consecutive": ([(2 * r, 2 * r + 1) for r in range(degree)], lambda c: c)}


def rank_tiles(bounds: list[int], seq_len: int, degree: int) -> dict[str, list[list[tuple]]]:
    chunk = seq_len // (2 * degree)
    return {name: [attention_tiles(bounds, chunks, chunk, slot) for chunks in per_rank]
            for name, (per_rank, slot) in layouts(degree).items()}


def busiest_over_mean(values: list[float]) -> float:
    return max(values) * len(values) / sum(values)


def balance_table(seq_lens: list[int], degrees: list[int]) -> None:
    print("attention work per rank (query-key pairs): the busiest rank over the mean; zig-zag (ours) vs consecutive")
    print("| T | CP | packing | zig-zag | consecutive | pairs per rank, zig-zag | pairs per rank, consecutive |")
    for seq_len in seq_lens:
        for degree in (d for d in degrees if d > 1):
            for packing, bounds in (("4k documents", packed_boundaries(seq_len).tolist()),
                                    ("one document", [0, seq_len])):
                work = {name: [attention_work(t) for t in tiles]
                        for name, tiles in rank_tiles(bounds, seq_len, degree).items()}
                assert sum(work["zig-zag"]) == sum(work["consecutive"])  # the same pairs, split differently
                print(f"| {seq_len} | {degree} | {packing} | {busiest_over_mean(work['zig-zag']):.3f} | "
                      f"{busiest_over_mean(work['consecutive']):.3f} | {work['zig-zag']} | {work['consecutive']} |")


def timed_attention(seq_len: int, degree: int, heads: int = 8, kv_heads: int = 2, head_dim: int = 256,
                    repeats: int = 3) -> dict[str, list[float]]:
    """Per layout, each rank's best-of-`repeats` seconds of the CPU tiled attention forward + backward over one
    document filling the row (the layouts alternate, so that load from other processes hits both alike)."""
    gen = torch.Generator().manual_seed(0)
    chunk = seq_len // (2 * degree)
    keys, values = (torch.randn(1, kv_heads, seq_len, head_dim, generator=gen) for _ in range(2))
    query = torch.randn(1, heads, 2 * chunk, head_dim, generator=gen)
    tiles = rank_tiles([0, seq_len], seq_len, degree)
    best = {name: [float("inf")] * degree for name in tiles}
    for _ in range(repeats):
        for rank in range(degree):
            for name in tiles:
                q, k, v = (x.clone().requires_grad_() for x in (query, keys, values))
                start = time.perf_counter()
                out, _ = tiled_attention(q, k, v, torch.tensor(tiles[name][rank]), head_dim ** -0.5)
                out.sum().backward()
                best[name][rank] = min(best[name][rank], time.perf_counter() - start)
    return best


def one_device_step_memory(flavor: str, seq_len: int, device: str, dtype: torch.dtype) -> dict[str, float]:
    """One forward + backward of the model on one device without context parallelism (CP = 1), a row of 4,096-token
    documents, the loss by the chunked linear cross entropy (no [T, vocab] logits): the memory model (the
    activations saved for the backward, counted by saved_tensors_hooks, plus the parameter gradients) and, on CUDA,
    the measured peak above the parameters (torch.cuda.max_memory_allocated). A first step warms the kernels up."""
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config.from_flavor(flavor)).to(device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    labels = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    cu = packed_boundaries(seq_len).to(device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        saved, loss = saved_activation_bytes(lambda: linear_cross_entropy(
            model(ids, cu_seqlens=cu, output="hidden"), model.lm_head.weight, labels) / seq_len)
        loss.backward()
        del loss
        if device == "cuda":
            torch.cuda.synchronize()
    result = {"parameters_gib": params / 2**30, "saved_activations_gib": saved / 2**30,
              "model_peak_gib": (saved + params) / 2**30}
    if device == "cuda":
        result["measured_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        result["measured_over_model"] = result["measured_peak_gib"] / result["model_peak_gib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", default="2048,4096,8192,16384")
    parser.add_argument("--degrees", default="1,2,4")
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--balance-only", action="store_true", help="only the attention balance tables")
    parser.add_argument("--timed-seq-len", type=int, default=8192)
    parser.add_argument("--one-device-step", choices=("cpu", "cuda"),
                        help="only the memory model vs the measured peak of one step at CP = 1 on this device, at "
                             "each --seq-lens (bf16; the GPU session's cp_32k step)")
    args = parser.parse_args()
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    degrees = [int(d) for d in args.degrees.split(",")]
    if args.one_device_step:
        for seq_len in seq_lens:
            result = one_device_step_memory(args.flavor, seq_len, args.one_device_step, torch.bfloat16)
            print(f"{args.flavor} T={seq_len} CP=1 bf16 on {args.one_device_step}: " +
                  ", ".join(f"{key} {value:.3f}" for key, value in result.items()), flush=True)
        return
    torch.set_num_threads(1)

    balance_table(seq_lens, degrees)
    print(f"\nCPU tiled attention fwd + bwd per rank, one document of {args.timed_seq_len} tokens (fp32, 8 x 256 query "
          "heads, 2 key-value heads): seconds per rank; busiest over mean")
    print("| T | CP | layout | seconds per rank | busiest / mean |")
    for degree in (d for d in degrees if d > 1):
        for name, times in timed_attention(args.timed_seq_len, degree).items():
            print(f"| {args.timed_seq_len} | {degree} | {name} | {', '.join(f'{t:.3f}' for t in times)} | "
                  f"{busiest_over_mean(times):.2f} |")
    if args.balance_only:
        return

    memory = {d: measure(args.flavor, seq_lens) if d == 1 else run_distributed(measure, args.flavor, seq_lens,
                                                                             world_size=d) for d in degrees}
    print(f"activation memory per rank (saved for backward, fp32, {args.flavor}, documents of {DOCUMENT_LEN})")
    print("| T | " + " | ".join(f"CP={d}" for d in degrees) + " | " +
          " | ".join(f"CP={d} / CP=1" for d in degrees if d != 1) + " |")
    for i, seq_len in enumerate(seq_lens):
        cells = [f"{memory[d][i] / 2**20:.1f} MiB" for d in degrees]
        ratios = [f"{memory[d][i] / memory[1][i]:.3f}" for d in degrees if d != 1 and 1 in memory]
        print(f"| {seq_len} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")

    print("\nbytes each rank sends per layer and forward (bf16 activations; receives (CP - 1) x as much)")
    for flavor in (args.flavor, "0.8B"):
        config = qwen35.Qwen35Config.from_flavor(flavor)
        print(f"{flavor}: | T | CP | GDN (M, U) | GDN conv halo | GDN total | attention K, V | attention / GDN |")
        for seq_len in (16384, 32768, 262144):
            for degree in (2, 4, 8):
                print("\n".join(communication_table(config, seq_len, degree, dtype_bytes=2)))


if __name__ == "__main__":
    main()
