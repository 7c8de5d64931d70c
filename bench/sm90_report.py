"""Offline sm_90 report of the gated-delta-rule Triton kernels at the launch configurations our code uses (no GPU).

Runs the real launch functions of kernels/gated_delta_rule (the chunked forward + backward of a training step, and
a decode step of the recurrent kernel) on meta tensors with triton's JITFunction.run replaced by a recorder, so it
follows whatever kernels, grids, constexprs, num_warps and num_stages that code chooses. Each distinct launch is
then compiled for sm_90 (GPUTarget("cuda", 90, 32)) through Triton's own argument binder and compiler, and ptxas's
report is read. Shapes: bf16 q/k/v/beta, fp32 g, K = V = 128, 16 q/k heads and 16 value heads, in-kernel q/k L2
norm, no initial / final state (a training step: Qwen3.5-0.8B's delta-rule layers; kind "chunk fwd+bwd") and with
initial and final states and their gradients (as context parallelism and chunked prefill call it: "chunk +states");
rows of 4,096-token documents packed with cu_seqlens (1 x 4,096 and 8 x 4,096 tokens); the decode step: 1 and 8
rows of one token with the state read and written.

Per distinct compiled launch: V-block width (BV, "-" where the kernel takes none), registers, spill bytes (stores /
loads), stack frame bytes, shared memory, num_warps / num_stages, programs launched at the two shapes ("-" at a shape that launches
the kernel with another configuration), whether the programs walk the sequence (their number does not grow with the
tokens: the state walks), and whether its PTX prefetches with cp.async or TMA (cp.async.bulk), i.e. whether a loop
was software pipelined with asynchronous copies.

    python bench/sm90_report.py [--json out.json]
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys

import torch
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels.gated_delta_rule import triton_chunk, triton_recurrent  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
H = HV = 16
K = V = 128
DOC_TOKENS = 4096
SHAPES = (1, 8)  # documents of 4,096 tokens per packed row (training) / rows (decoding)
# A state walk may spill at most this much (ptxas spill stores) and must keep its asynchronous prefetch.
MAX_STATE_WALK_SPILL_BYTES = 64


@dataclasses.dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@contextlib.contextmanager
def recorded_launches():
    """Inside, `kernel[grid](...)` records a Launch instead of running (the kernel list is yielded)."""
    launches = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        if callable(grid):  # as JITFunction.run: the grid function gets the bound arguments, constexprs included
            grid = grid(dict(zip(self.arg_names, args), **kwargs))
        launches.append(Launch(self, args, dict(kwargs), tuple(grid)))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def training_launches(docs: int, doc_tokens: int = DOC_TOKENS, states: bool = False) -> list[Launch]:
    """Launches of the chunked forward + backward for one packed row of `docs` documents; with `states`, an initial
    state per document, the final states, and their gradients."""
    T = docs * doc_tokens
    q, k, v = _meta(1, T, H, K), _meta(1, T, H, K), _meta(1, T, HV, V)
    g, beta = _meta(1, T, HV, dtype=torch.float32), _meta(1, T, HV)
    cu_seqlens = torch.arange(docs + 1, dtype=torch.int32, device="meta") * doc_tokens
    h0 = _meta(docs, HV, K, V, dtype=torch.float32) if states else None
    with recorded_launches() as launches:
        o, final, residuals = triton_chunk.chunk_gated_delta_rule_fwd(
            q, k, v, g, beta, initial_state=h0, output_final_state=states, cu_seqlens=cu_seqlens, use_qk_l2norm=True)
        triton_chunk.chunk_gated_delta_rule_bwd(o, final, q, k, v, g, beta, residuals, initial_state=h0,
                                                cu_seqlens=cu_seqlens, use_qk_l2norm=True)
    return launches


def training_launches_with_states(docs: int) -> list[Launch]:
    return training_launches(docs, states=True)


def decode_launches(rows: int) -> list[Launch]:
    """Launches of a decode step: `rows` sequences of one token, state read and written in place."""
    q, k, v = _meta(rows, 1, H, K), _meta(rows, 1, H, K), _meta(rows, 1, HV, V)
    g, beta = _meta(rows, 1, HV, dtype=torch.float32), _meta(rows, 1, HV)
    state = _meta(rows, HV, K, V, dtype=torch.float32)
    with recorded_launches() as launches:
        triton_recurrent.recurrent_gated_delta_rule_fwd(q, k, v, g, beta, initial_state=state, use_qk_l2norm=True,
                                                        inplace_state=True)
    return launches


@dataclasses.dataclass
class Compiled:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int  # the stack frame (spills and local arrays), which cuobjdump -res-usage reports as STACK
    shared_bytes: int
    num_warps: int
    num_stages: int
    prefetch: str  # "TMA", "cp.async" or "none"
    ptxas: str  # the ptxas Triton ran, and its CUDA release


def _ptxas_figure(log: str, pattern: str) -> int:
    found = re.findall(pattern, log)
    if not found:
        raise RuntimeError(f"no '{pattern}' in the ptxas report:\n{log}")
    return max(int(x) for x in found)


def _ptxas_release(log: str) -> str:
    """'<tool> <CUDA release>' of the ptxas that wrote `log` (Triton ships its own in backends/nvidia/bin)."""
    tool = re.search(r"^(\S+) info", log, re.MULTILINE).group(1)
    binary = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", tool)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", version)
    return f"{tool} {release.group(1) if release else '?'}"


def compile_for_sm90(launch: Launch) -> Compiled:
    """Compile one recorded launch for sm_90 exactly as JITFunction.run would on an H100/H200, and read ptxas's
    register / spill report (printed by Triton when knobs.nvidia.dump_ptxas_log is set)."""
    backend = make_backend(SM90)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args, specialization,
                                                              options)
    log = io.StringIO()
    knobs = triton.knobs
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True  # the log only comes with ptxas
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=SM90,
                                      options=options.__dict__)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    log = log.getvalue()
    ptx = compiled.asm["ptx"]
    prefetch = "TMA" if "cp.async.bulk.tensor" in ptx else "cp.async" if "cp.async" in ptx else "none"
    return Compiled(registers=_ptxas_figure(log, r"Used (\d+) registers"),
                    spill_stores=_ptxas_figure(log, r"(\d+) bytes spill stores"),
                    spill_loads=_ptxas_figure(log, r"(\d+) bytes spill loads"),
                    stack_bytes=_ptxas_figure(log, r"(\d+) bytes stack frame"),
                    shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                    num_stages=compiled.metadata.num_stages, prefetch=prefetch, ptxas=_ptxas_release(log))


def _by_occurrence(launches: list[Launch]) -> dict:
    """{(kernel name, n-th launch of it): launch}: matches the launches of the same code at two shapes."""
    seen, keyed = {}, {}
    for launch in launches:
        n = seen[launch.name] = seen.get(launch.name, -1) + 1
        keyed[(launch.name, n)] = launch
    return keyed


def state_walks(launches_by_shape: list[list[Launch]], longer: list[Launch]) -> set:
    """Names of the chunk kernels whose program count does not grow with the tokens (one document of 4,096 vs
    8,192): they walk the sequence chunk after chunk."""
    short, long_ = _by_occurrence(launches_by_shape[0]), _by_occurrence(longer)
    return {key[0] for key, launch in short.items() if long_[key].programs == launch.programs}


def _compile_key(launch: Launch) -> tuple:
    """Launches that compile to the same binary (same kernel, dtypes, constexprs and options)."""
    args = tuple((type(a).__name__, str(a.dtype)) if isinstance(a, torch.Tensor) else a for a in launch.args)
    return launch.name, args, tuple(sorted(launch.kwargs.items()))


def report(kernel_filter=None) -> list[dict]:
    """One row per distinct compiled launch (in launch order, over both shapes and the kinds of call: a kernel whose
    launch configuration depends on the shape, like the state walks' V-block width, or on the call, like their
    optional states, has a row per configuration, with the programs of the shapes that launch it);
    kernel_filter(name, is_state_walk) selects rows."""
    rows, by_binary = [], {}
    for kind, make, shapes in (("chunk fwd+bwd", training_launches, SHAPES),
                               ("chunk +states", training_launches_with_states, SHAPES),
                               ("decode", decode_launches, SHAPES)):
        per_shape = [make(n) for n in shapes]
        walks = state_walks(per_shape, training_launches(1, 2 * DOC_TOKENS)) if make is not decode_launches else set()
        for n, launches in zip(shapes, per_shape):
            for launch in launches:
                is_walk = launch.name in walks
                if kernel_filter is not None and not kernel_filter(launch.name, is_walk):
                    continue
                ckey = _compile_key(launch)
                if ckey not in by_binary:
                    by_binary[ckey] = dict(kind=kind, kernel=launch.name, state_walk=is_walk,
                                           block_v=launch.kwargs.get("BV"), programs={}, grid={},
                                           **dataclasses.asdict(compile_for_sm90(launch)))
                    rows.append(by_binary[ckey])
                by_binary[ckey]["programs"][n] = launch.programs
                by_binary[ckey]["grid"][n] = launch.grid
    return rows


def _print_table(rows):
    header = (f"{'kind':<14} {'kernel':<22} {'walk':<5} {'BV':>4} {'warps':>5} {'stages':>6} {'regs':>5} "
              f"{'spill st/ld B':>14} {'stack B':>7} {'smem B':>7} {'prefetch':<9} {'programs 1x / 8x':>18}")
    print(header)
    print("-" * len(header))
    for r in rows:
        programs = " / ".join(f"{r['programs'][n]:,}" if n in r["programs"] else "-" for n in SHAPES)
        print(f"{r['kind']:<14} {r['kernel']:<22} {'yes' if r['state_walk'] else 'no':<5} "
              f"{r['block_v'] or '-':>4} {r['num_warps']:>5} "
              f"{r['num_stages']:>6} {r['registers']:>5} {r['spill_stores']:>6} / {r['spill_loads']:<5} "
              f"{r['stack_bytes']:>7} {r['shared_bytes']:>7} {r['prefetch']:<9} {programs:>18}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = report()
    ptxas = ", ".join(sorted({row["ptxas"] for row in rows}))
    print(f"Triton {triton.__version__} ({ptxas}), torch {torch.__version__}, target sm_90; bf16, K = V = {K}, H = HV = {H}, "
          f"L2 norm in kernel, without and with initial/final states; programs at 1 x {DOC_TOKENS:,} and 8 x {DOC_TOKENS:,} tokens "
          f"(chunked: packed documents of {DOC_TOKENS:,}; decode: 1 and 8 rows)")
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
