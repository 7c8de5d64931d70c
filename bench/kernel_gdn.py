"""GPU benchmark of the chunked gated delta rule: our Triton op vs fla 0.6.0 vs the torch reference, one run.

bf16, shapes N x T x heads: N documents of T tokens packed into one row (cu_seqlens), as many q/k as value heads,
K = V = 128, in-kernel q/k L2 norm (as Qwen3.5 calls it); the torch reference is timed at the first shape only
(it is slow). Defaults: fla's and FlashQLA's published shapes 1x4096x16 (Qwen3.5-0.8B's training row), 8x4096x16
and 1x32768x64. For every shape: forward
and forward+backward time (triton.testing.do_bench, median), TFLOP/s with the algorithmic count of a chunk-64 WY
implementation (180,224 forward and 464,896 backward FLOPs per token per value head at d = 128), the speed ratio
against fla measured in the same run, and the difference between our outputs/gradients and fla's. Also checks that
a function calling the op compiles with fullgraph=True without graph breaks, and breaks our forward + backward
down by kernel (torch.profiler) at every shape (the state walks' V-block width depends on the shape). Results go
to stdout and, as JSON, to --out.

    python bench/kernel_gdn.py --out bench_gdn.json [--shapes 1x4096x16 8x4096x16 1x32768x64]
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels.gated_delta_rule import ops, reference  # noqa: E402

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
    import fla
    from fla_peer import lift_fla_backward_refusal
    FLA_VERSION = getattr(fla, "__version__", "unknown")
    FLA_NOTE = lift_fla_backward_refusal()
except ImportError:
    fla_chunk_gated_delta_rule = None
    FLA_VERSION = FLA_NOTE = None

K, V = 128, 128
# Per token per value head at d = 128, chunk 64 (kernel FLOPs as a chunked WY implementation computes them:
# forward 10 C d + 6 d^2; backward = its matmuls + the recompute of w, u and the chunk states).
FWD_FLOPS = 180_224
BWD_FLOPS = 464_896


def parse_shape(text):
    """"NxTxH" -> (N documents, T tokens each, H heads)."""
    try:
        num_docs, doc_len, heads = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxTxH (documents x tokens each x heads), got {text!r}")
    return num_docs, doc_len, heads


def make_inputs(T, HV, doc_len, device, seed=0, H=None):
    """One packed row of T tokens in documents of doc_len, H q/k heads (default HV) and HV value heads."""
    H = H or HV
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    q = randn(1, T, H, K).bfloat16()
    k = randn(1, T, H, K).bfloat16()
    v = randn(1, T, HV, V).bfloat16()
    # Qwen3.5's gate and beta: g = -exp(A_log) softplus(a + dt_bias) in fp32, beta = sigmoid(b).
    g = -F.softplus(randn(1, T, HV) - 2.0) * 0.5
    beta = torch.sigmoid(randn(1, T, HV)).bfloat16()
    bounds = list(range(0, T, doc_len)) + [T]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    return (q, k, v, g, beta), cu_seqlens


def run_ours(q, k, v, g, beta, cu_seqlens):
    o, _ = ops.chunk_gated_delta_rule_op(q, k, v, g, beta, cu_seqlens=cu_seqlens, use_qk_l2norm=True,
                                         backend="triton")
    return o


def run_fla(q, k, v, g, beta, cu_seqlens):
    # cu_seqlens_cpu spares fla its device-to-host copy (ours never syncs).
    o, _ = fla_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
                                      cu_seqlens=cu_seqlens.long(), cu_seqlens_cpu=cu_seqlens.cpu().long())
    return o


def run_reference(q, k, v, g, beta, cu_seqlens):
    o, _ = reference.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens, use_qk_l2norm=True)
    return o


IMPLS = {"ours": run_ours, "fla": run_fla, "torch_reference": run_reference}


def forward_and_grads(fn, inputs, cu_seqlens, do):
    leaves = [x.detach().requires_grad_() for x in inputs]
    o = fn(*leaves, cu_seqlens)
    return o, torch.autograd.grad(o, leaves, do)


def time_ms(fn, inputs, cu_seqlens, do, warmup, rep):
    with torch.no_grad():
        fwd = triton.testing.do_bench(lambda: fn(*inputs, cu_seqlens), warmup=warmup, rep=rep, return_mode="median")
    fwd_bwd = triton.testing.do_bench(lambda: forward_and_grads(fn, inputs, cu_seqlens, do), warmup=warmup, rep=rep,
                                      return_mode="median")
    return fwd, fwd_bwd


def tflops(flops_per_token_head, T, HV, ms):
    return flops_per_token_head * T * HV / (ms * 1e-3) / 1e12


def compare(ours, peer):
    """Max abs difference and relative L2 error of each output/gradient of ours against a peer."""
    names = ["o", "dq", "dk", "dv", "dg", "dbeta"]
    out = {}
    for name, a, b in zip(names, ours, peer):
        a, b = a.float(), b.float()
        out[name] = {"max_abs": (a - b).abs().max().item(),
                     "rel_l2": ((a - b).norm() / b.norm().clamp_min(1e-30)).item()}
    return out


def diff_line(diffs):
    return ", ".join(f"{name} {d['rel_l2']:.1e}" for name, d in diffs.items()) + " (relative L2)"


def compile_check(device):
    """torch._dynamo.explain of a small function calling the op: the op must be one opaque node."""
    (q, k, v, g, beta), cu_seqlens = make_inputs(256, 32, 128, device, H=16)

    def layer(q, k, v, g, beta, cu_seqlens):
        o, _ = ops.chunk_gated_delta_rule_op(q, k, v, g, beta, cu_seqlens=cu_seqlens, use_qk_l2norm=True)
        return o.float().square().mean()

    explanation = torch._dynamo.explain(layer)(q, k, v, g, beta, cu_seqlens)
    compiled = torch.compile(layer, fullgraph=True)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    compiled(*leaves, cu_seqlens).backward()
    return {"graph_count": explanation.graph_count, "graph_break_count": explanation.graph_break_count,
            "fullgraph_compile_fwd_bwd": "ok"}


def kernel_breakdown(T, HV, doc_len, device, iters=5):
    """GPU time per forward + backward of each kernel of ours (torch.profiler), longest first: where to optimise."""
    inputs, cu_seqlens = make_inputs(T, HV, doc_len, device)
    do = torch.randn(1, T, HV, V, device=device).bfloat16()
    for _ in range(3):
        forward_and_grads(run_ours, inputs, cu_seqlens, do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            forward_and_grads(run_ours, inputs, cu_seqlens, do)
        torch.cuda.synchronize()
    rows = [(event.key, event.device_time_total / iters / 1e3) for event in prof.key_averages()
            if event.device_time_total > 0]
    return sorted(rows, key=lambda row: -row[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=["1x4096x16", "8x4096x16", "1x32768x64"],
                        help="NxTxH: N packed documents of T tokens, H q/k and value heads")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the torch reference")
    args = parser.parse_args()
    args.shapes = [parse_shape(s) if isinstance(s, str) else s for s in args.shapes]  # argparse skips defaults
    if not torch.cuda.is_available():
        sys.exit("kernel_gdn.py needs a CUDA GPU")
    device = torch.device("cuda")

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "fla": FLA_VERSION or "not installed", "fla_note": FLA_NOTE, "dtype": "bfloat16", "K": K, "V": V,
               "flops_per_token_per_value_head": {"fwd": FWD_FLOPS, "bwd": BWD_FLOPS},
               "runs": []}
    print(f"device {results['device']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"fla {results['fla']}" + (f"\n{FLA_NOTE}" if FLA_NOTE else ""))
    try:
        results["compile_check"] = compile_check(device)
    except Exception as err:  # noqa: BLE001  (report it; the timings below do not depend on it)
        results["compile_check"] = {"error": f"{type(err).__name__}: {err}"}
    print(f"compile check: {results['compile_check']}", flush=True)

    impls = {name: fn for name, fn in IMPLS.items()
             if not (name == "fla" and fla_chunk_gated_delta_rule is None)
             and not (name == "torch_reference" and args.skip_reference)}
    header = f"{'shape':>12} {'impl':>16} {'fwd ms':>9} {'fwd TF/s':>9} {'f+b ms':>9} {'f+b TF/s':>9}"
    for index, (num_docs, doc_len, HV) in enumerate(args.shapes):
        T = num_docs * doc_len
        shape = f"{num_docs}x{doc_len}x{HV}"
        inputs, cu_seqlens = make_inputs(T, HV, doc_len, device)
        do = torch.randn(1, T, HV, V, device=device).bfloat16()
        run = {"shape": shape, "T": T, "H": HV, "HV": HV, "num_docs": num_docs, "impls": {}}
        try:
            breakdown = kernel_breakdown(T, HV, doc_len, device)
            run["kernel_breakdown_ms_per_fwd_bwd"] = dict(breakdown)
            print(f"ours at {shape}, GPU ms per forward + backward by kernel (torch.profiler):")
            for name, ms in breakdown[:12]:
                print(f"  {ms:8.3f}  {name}")
        except Exception as err:  # noqa: BLE001  (report it; the timings below do not depend on it)
            run["kernel_breakdown_ms_per_fwd_bwd"] = {"error": f"{type(err).__name__}: {err}"}
            print(f"kernel breakdown at {shape} failed: {run['kernel_breakdown_ms_per_fwd_bwd']['error']}")
        print(header)
        for name, fn in impls.items():
            if name == "torch_reference" and index > 0:
                continue  # the reference's speed is known after one shape; it only slows the run
            fwd_ms, fwd_bwd_ms = time_ms(fn, inputs, cu_seqlens, do, args.warmup, args.rep)
            entry = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                     "fwd_tflops": tflops(FWD_FLOPS, T, HV, fwd_ms),
                     "fwd_bwd_tflops": tflops(FWD_FLOPS + BWD_FLOPS, T, HV, fwd_bwd_ms)}
            run["impls"][name] = entry
            print(f"{shape:>12} {name:>16} {fwd_ms:>9.3f} {entry['fwd_tflops']:>9.1f} "
                  f"{fwd_bwd_ms:>9.3f} {entry['fwd_bwd_tflops']:>9.1f}")
        o, grads = forward_and_grads(run_ours, inputs, cu_seqlens, do)
        ours_out = [o, *grads]
        if "torch_reference" in run["impls"]:
            ref_o, ref_grads = forward_and_grads(run_reference, inputs, cu_seqlens, do)
            run["diff_vs_reference"] = compare(ours_out, [ref_o, *ref_grads])
            print(f"{'':>29} ours vs torch reference: {diff_line(run['diff_vs_reference'])}")
        if "fla" in run["impls"]:
            ours, fla_ = run["impls"]["ours"], run["impls"]["fla"]
            run["speedup_vs_fla"] = {"fwd": fla_["fwd_ms"] / ours["fwd_ms"],
                                     "fwd_bwd": fla_["fwd_bwd_ms"] / ours["fwd_bwd_ms"]}
            fla_o, fla_grads = forward_and_grads(run_fla, inputs, cu_seqlens, do)
            run["diff_vs_fla"] = compare(ours_out, [fla_o, *fla_grads])
            # Gradients count only where fla's backward is trusted on this Triton (bench/fla_peer.py).
            checked = ["o"] if FLA_NOTE else list(run["diff_vs_fla"])
            worst = max(run["diff_vs_fla"][name]["rel_l2"] for name in checked)
            # bf16 storage of q/k/v and of the intermediates: both sides round at ~4e-3 relative.
            run["matches_fla"] = {"checked": checked, "ok": math.isfinite(worst) and worst < 2e-2}
            print(f"{'':>29} speedup vs fla: fwd {run['speedup_vs_fla']['fwd']:.2f}x, "
                  f"fwd+bwd {run['speedup_vs_fla']['fwd_bwd']:.2f}x; vs fla: {diff_line(run['diff_vs_fla'])}")
        else:
            print(f"{'':>29} fla: not installed")
        results["runs"].append(run)
        with open(args.out, "w") as f:  # after every row, so a run stopped at its time limit keeps its rows
            json.dump(results, f, indent=2)
        del inputs, do
        torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
