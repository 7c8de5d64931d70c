"""Context parallelism on CPU (gloo): activation memory per rank vs sequence length at CP = 1, 2, 4, and the bytes
each rank sends per layer and forward (the backward's reduce-scatters mirror them).

    python bench/context_parallel.py [--seq-lens 2048,4096,8192,16384] [--degrees 1,2,4] [--flavor debug]

Activation memory is the bytes of the distinct storages autograd saves for the backward during one forward of the
model (fp32, one packed row of documents of 4,096 tokens, the last one shorter), measured with
torch.autograd.graph.saved_tensors_hooks on every rank; the table prints the largest rank's and its ratio to CP = 1
(one process, no context parallelism: the peer). Communication is computed from the shapes of the all-gathers.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import qwen35  # noqa: E402
from distributed_utils import run_distributed  # noqa: E402
from parallelism.context_parallel import ContextParallel, apply_context_parallel  # noqa: E402

DOCUMENT_LEN = 4096


def packed_boundaries(seq_len: int) -> torch.Tensor:
    return torch.tensor(sorted({*range(0, seq_len, DOCUMENT_LEN), seq_len}), dtype=torch.int32)


def saved_activation_bytes(forward) -> int:
    """Bytes of the distinct storages saved for the backward while `forward()` runs."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


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
            nbytes = saved_activation_bytes(lambda: model(ids, cu_seqlens=cu))
        else:
            shard = cp.shard(cu, seq_len)
            nbytes = saved_activation_bytes(lambda: model(ids[:, shard.start:shard.end],
                                                          position_ids=shard.position_ids,
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
    state = hv * k * (v + k) * 4  # [U | M] in fp32
    halo = (config.linear_conv_kernel_dim - 1) * config.conv_dim * dtype_bytes
    attention = 2 * local * config.num_key_value_heads * config.head_dim * dtype_bytes
    return [f"| {seq_len} | {degree} | {state / 2**10:.1f} KiB | {halo / 2**10:.2f} KiB | "
            f"{(state + halo) / 2**10:.1f} KiB | {attention / 2**20:.1f} MiB | {attention / (state + halo):.0f} |"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", default="2048,4096,8192,16384")
    parser.add_argument("--degrees", default="1,2,4")
    parser.add_argument("--flavor", default="debug")
    args = parser.parse_args()
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    degrees = [int(d) for d in args.degrees.split(",")]
    torch.set_num_threads(1)

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
