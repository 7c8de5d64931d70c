"""Our torch reference kernels vs their peers on the same CPU and threads, in one run.

    python bench/kernels_cpu.py [--threads 2] [--repeats 7]

1. Chunked gated delta rule, forward + backward: ours vs transformers' `torch_chunk_gated_delta_rule` (its CPU path).
2. Causal depthwise conv + SiLU, forward + backward: ours (shifted multiply-adds) vs a grouped `F.conv1d`.
Prints median milliseconds and the ratio.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kernels


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def fwd_bwd(fn, inputs):
    def run():
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.models.qwen3_5 import modeling_qwen3_5

    hf_chunk = getattr(modeling_qwen3_5.torch_chunk_gated_delta_rule, "__wrapped__",
                       modeling_qwen3_5.torch_chunk_gated_delta_rule)
    gen = torch.Generator().manual_seed(0)
    B, T, H, HV, D = 2, 2048, 4, 8, 64
    q, k = (torch.randn(B, T, H, D, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, HV, D, generator=gen).requires_grad_()
    g = (-torch.rand(B, T, HV, generator=gen) * 0.1).requires_grad_()
    beta = torch.rand(B, T, HV, generator=gen).requires_grad_()
    inputs = (q, k, v, g, beta)
    ours = median_ms(fwd_bwd(lambda *x: kernels.chunk_gated_delta_rule(*x, use_qk_l2norm=True)[0], inputs),
                     args.repeats)
    peer = median_ms(fwd_bwd(lambda *x: hf_chunk(*x, use_qk_l2norm_in_kernel=True)[0], inputs), args.repeats)
    print(f"delta rule fwd+bwd B={B} T={T} H={H} HV={HV} K=V={D}: ours {ours:.1f} ms, transformers {peer:.1f} ms, "
          f"{peer / ours:.2f}x")

    C, W = 1024, 4
    x = torch.randn(B, T, C, generator=gen).requires_grad_()
    weight = (torch.randn(C, W, generator=gen) * 0.1).requires_grad_()

    def grouped_conv1d(x, weight):
        return F.silu(F.conv1d(x.transpose(1, 2), weight[:, None], padding=W - 1, groups=C)[..., :T]).transpose(1, 2)

    ours = median_ms(fwd_bwd(lambda *a: kernels.causal_conv1d(*a)[0], (x, weight)), args.repeats)
    peer = median_ms(fwd_bwd(grouped_conv1d, (x, weight)), args.repeats)
    print(f"causal conv fwd+bwd B={B} T={T} C={C} W={W}: ours {ours:.1f} ms, grouped F.conv1d {peer:.1f} ms, "
          f"{peer / ours:.2f}x")


if __name__ == "__main__":
    main()
