"""Training-step throughput: our model eager vs compiled per block, and on a GPU next to transformers + fla.

    python bench/train_step.py [--threads 2] [--warmup 3] [--repeats 5] [--skip-gpu]

A step is what torchtitan's trainer does per batch: forward, cross entropy (mean over the tokens), backward,
gradient-norm clipping (max_norm 1.0), AdamW (foreach) step, zero_grad. "Compiled" is the model after
`parallelism.parallelize(model, ParallelDims(world_size=1), None, ParallelizeSettings(compile=True))`, i.e. what
the trainer does with `[compile] enable = true, components = ["model", "loss"]` (the recipes' setting):
`torch.compile(fullgraph=True)` (inductor) of each decoder block, and of the cross entropy; embedding, final norm, lm_head and optimizer stay eager. Eager and compiled copies start from the same weights and are timed
alternately step by step (so machine noise hits both alike); compile time is excluded by `--warmup` steps.

- CPU (always): the `debug` flavor in fp32 on the batch of train_configs/debug.toml: 4 windows of 256 tokens
  packed into one row [1, 1024] with cu_seqlens at the window boundaries.
- CUDA (when available): the `0.8B` flavor in bf16 (parameters, gradients and AdamW state), one sequence of
  4096 tokens, with MFU = tokens/s x FLOPs/token (torchtitan_ext/flops.py, the trainer's formula) / the bf16 peak
  torchtitan assumes for the device. Next to it transformers' Qwen3_5ForCausalLM with the same weights and step,
  which uses fla's Triton delta rule when `fla` is importable; without fla that row is skipped (transformers
  would fall back to its torch delta rule, not a meaningful GPU peer) and the script says so.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from parallelism import ParallelDims, ParallelizeSettings, parallelize  # noqa: E402
from qwen35 import Qwen35Config, Qwen35ForCausalLM  # noqa: E402
from torchtitan_ext.flops import flops_per_token  # noqa: E402


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def make_step(model, ids, labels, cu_seqlens, logits_of=lambda out: out, loss_fn=cross_entropy):
    """One training step of `model` (forward, loss, backward, clip, AdamW, zero_grad); returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}

    def step():
        logits = logits_of(model(ids, **kwargs))
        loss = loss_fn(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternately(steps: dict, device: torch.device, warmup: int, repeats: int):
    """{name: step} -> ({name: median wall seconds}, {name: median process CPU seconds}, {name: first warm-up
    loss}, {name: warm-up seconds}). CPU seconds (all threads) are less sensitive than wall time to other
    processes competing for the cores."""
    first_loss, warmup_s = {}, {}
    for name, step in list(steps.items()):
        start = time.perf_counter()
        try:
            for i in range(warmup):
                loss = step()
                if i == 0:
                    first_loss[name] = loss.float().item()
            sync(device)
        except Exception:  # one failing variant must not cost the others' numbers: report it and go on
            print(f"{name}: the step failed and is left out:\n{traceback.format_exc()}", flush=True)
            del steps[name]
            continue
        warmup_s[name] = time.perf_counter() - start
        print(f"{name}: first loss {first_loss[name]:.5f}, {warmup} warm-up steps (incl. compile/autotune) in "
              f"{warmup_s[name]:.1f} s", flush=True)
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = {name: statistics.median(t) for name, t in wall.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    return median, median_cpu, first_loss, warmup_s


# torchtitan's trainer with "loss" in compile.components compiles its loss function the same way
COMPILED_LOSS = torch.compile(cross_entropy)


def eager_and_compiled(config: Qwen35Config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Two copies of one randomly initialised model, the second parallelized with compile=True."""
    torch.manual_seed(seed)
    with torch.device(device):
        eager = Qwen35ForCausalLM(config).to(dtype)
    compiled = copy.deepcopy(eager)
    parallelize(compiled, ParallelDims(world_size=1), None, ParallelizeSettings(compile=True))
    return eager, compiled


def batch(vocab: int, n_windows: int, seq: int, device: torch.device, packed: bool):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (1, n_windows * seq + 1), generator=gen)
    ids, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    cu = torch.arange(0, n_windows * seq + 1, seq, dtype=torch.int32, device=device) if packed else None
    return ids, labels, cu


def cpu_part(args) -> None:
    device = torch.device("cpu")
    config = Qwen35Config.from_flavor("debug")
    eager, compiled = eager_and_compiled(config, torch.float32, device)
    ids, labels, cu = batch(config.vocab_size, args.cpu_windows, args.cpu_seq, device, packed=True)
    steps = {"eager": make_step(eager, ids, labels, cu),
             "compiled": make_step(compiled, ids, labels, cu, loss_fn=COMPILED_LOSS)}
    median, median_cpu, first_loss, warmup_s = time_alternately(steps, device, args.warmup, args.repeats)
    tokens = ids.numel()
    print(f"CPU: debug flavor, fp32, batch [1, {tokens}] = {args.cpu_windows} x {args.cpu_seq} packed, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} steps after "
          f"{args.warmup} warm-up")
    print(f"  first-step loss eager {first_loss['eager']:.5f} compiled {first_loss['compiled']:.5f}; "
          f"warm-up (incl. compile) eager {warmup_s['eager']:.1f} s compiled {warmup_s['compiled']:.1f} s")
    print(f"  {'':10s} {'step ms':>9s} {'tokens/s':>10s} {'CPU ms (all threads)':>21s}")
    for name in ("eager", "compiled"):
        print(f"  {name:10s} {median[name] * 1e3:9.1f} {tokens / median[name]:10.0f} {median_cpu[name] * 1e3:21.1f}")
    print(f"  compiled / eager tokens/s: {median['eager'] / median['compiled']:.2f}x "
          f"(by CPU time: {median_cpu['eager'] / median_cpu['compiled']:.2f}x)")


def peak_bf16_flops(device_name: str) -> tuple[float, str]:
    """The dense bf16 peak MFU is taken against: torchtitan's table (what the trainer's MFU uses); the H100 SXM
    datasheet figure if torchtitan cannot be imported next to this torch."""
    try:
        from torchtitan.tools.utils import get_peak_flops
        return get_peak_flops(device_name), "torchtitan's table"
    except Exception as err:  # noqa: BLE001  (any import failure: say so and use the datasheet figure)
        return 989e12, f"H100 SXM datasheet; torchtitan not importable: {type(err).__name__}: {err}"


def gpu_part(args, device: torch.device = torch.device("cuda")) -> None:
    config = Qwen35Config.from_flavor(args.gpu_flavor)
    eager, compiled = eager_and_compiled(config, torch.bfloat16, device)
    ids, labels, _ = batch(config.vocab_size, 1, args.gpu_seq, device, packed=False)
    steps = {"ours eager": make_step(eager, ids, labels, None),
             "ours compiled": make_step(compiled, ids, labels, None, loss_fn=COMPILED_LOSS)}

    fla_note = "fla not importable: transformers would run its torch delta rule, so it is not measured"
    if importlib.util.find_spec("fla") is not None:
        try:
            import fla  # noqa: F401
            from fla_peer import lift_fla_backward_refusal
            from hf_oracle import hf_text_config
            from transformers import Qwen3_5ForCausalLM

            with torch.device(device):
                hf = Qwen3_5ForCausalLM(hf_text_config(config)).to(torch.bfloat16)
            hf.config.use_cache = False
            missing, unexpected = hf.load_state_dict(eager.state_dict(), strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
            hf.tie_weights()
            hf.train()
            steps["transformers + fla"] = make_step(hf, ids, labels, None, logits_of=lambda out: out.logits)
            conv = "causal_conv1d" if importlib.util.find_spec("causal_conv1d") else "its torch causal conv"
            fla_note = f"transformers uses fla {getattr(fla, '__version__', '?')} (chunk_gated_delta_rule) and {conv}"
            lifted = lift_fla_backward_refusal()
            fla_note += f"; {lifted}" if lifted else ""
        except Exception as err:  # report, do not hide, why the peer is missing
            fla_note = f"fla importable but transformers + fla failed: {type(err).__name__}: {err}"

    median, _, first_loss, warmup_s = time_alternately(steps, device, args.warmup, args.repeats)
    tokens = ids.numel()
    flops = flops_per_token(eager, config, args.gpu_seq).total
    name = torch.cuda.get_device_name(device)
    peak, peak_source = peak_bf16_flops(name)
    print(f"\nGPU: {name}, {args.gpu_flavor} flavor, bf16, batch [1, {tokens}], torch {torch.__version__}; "
          f"{flops / 1e9:.3f} GFLOP/token (flops.py), peak {peak / 1e12:.0f} TFLOP/s ({peak_source})")
    print(f"  {fla_note}")
    print(f"  {'':20s} {'step ms':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>7s} {'1st loss':>9s} {'warm-up s':>9s}")
    for key, seconds in median.items():
        tps = tokens / seconds
        print(f"  {key:20s} {seconds * 1e3:9.1f} {tps:10.0f} {tps * flops / 1e12:8.1f} "
              f"{100 * tps * flops / peak:6.1f}% {first_loss[key]:9.4f} {warmup_s[key]:9.1f}")
    for fast, slow in [("ours compiled", "ours eager"), ("ours compiled", "transformers + fla"),
                       ("ours eager", "transformers + fla")]:
        if fast in median and slow in median:
            print(f"  {fast} / {slow} tokens/s: {median[slow] / median[fast]:.2f}x")
    print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (all models together)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-windows", type=int, default=4, help="debug.toml: local_batch_size")
    parser.add_argument("--cpu-seq", type=int, default=256, help="debug.toml: seq_len")
    parser.add_argument("--gpu-flavor", default="0.8B")
    parser.add_argument("--gpu-seq", type=int, default=4096)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_cpu:
        cpu_part(args)
    if args.skip_gpu:
        return
    if torch.cuda.is_available():
        gpu_part(args)
    else:
        print("\nGPU: CUDA is not available; the 0.8B bf16 seq-4096 measurement (with MFU, next to "
              "transformers + fla) did not run")


if __name__ == "__main__":
    main()
