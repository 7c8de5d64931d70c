"""Eval decoding throughput on a GSM8K-shaped batch: ours (compiled and eager) next to transformers, same weights.

    python bench/decode_gpu.py [--device cuda] [--flavor 0.8B] [--dtype bfloat16] [--batch 32] [--new-tokens 256]
        [--min-prompt 60] [--max-prompt 160] [--repeats 3] [--seed 0] [--no-compile] [--out decode.json]
    python bench/decode_gpu.py --device cpu --flavor debug --dtype float32 --batch 3 --new-tokens 8 --repeats 1 \
        --min-prompt 5 --max-prompt 12          # the CPU smoke test

#17's GPU goal: the 0.8B eval throughput (questions/s at batch 32) next to transformers. One batch is --batch
prompts of random tokens with lengths drawn (seeded) from [--min-prompt, --max-prompt] (GSM8K questions in the
chat template), left-padded as `torchtitan_ext.eval_gsm8k` pads them, each row decoding exactly --new-tokens
tokens greedily: EOS is disabled in both implementations so that every run does the same work (random weights
emit no meaningful EOS anyway). The time of a batch includes its prefill, as in the eval:
- ours compiled: `qwen35.generate(..., compile=True)`, eager prefill then compiled decode steps
  (`qwen35.decoding.compiled_decode_step`; CUDA graphs on CUDA); its first call pays the compile, printed
  separately (first call minus the median), with the graphs compiled during the timed calls (0 expected).
  Skipped, with the reason, where the model cannot compile (`decode_compile_unsupported`) or with --no-compile.
- ours eager: `compile=False`.
- transformers: `Qwen3_5ForCausalLM.generate` (greedy, its own cache) on the same weights (our state-dict keys are
  its text-only keys); on CUDA with the kernels it binds itself (fla's delta rule where fla imports; printed), on
  CPU its torch path.
Weights are random, made on the device (nothing is downloaded). After one warm-up call each, repeats are
interleaved so that a change of load hits all alike; medians. Also printed: the fraction of generated tokens on
which ours and transformers agree (greedy bf16 can split at a near-tie and then diverge: reported, not asserted;
fp32 should agree exactly).
"""

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import qwen35  # noqa: E402
from hf_oracle import force_torch_path, hf_text_config  # noqa: E402
from qwen35.decoding import decode_compile_unsupported  # noqa: E402

PAD = 0  # a token id for the padding columns (masked out; its value does not matter)


def build_models(config: qwen35.Qwen35Config, dtype: torch.dtype, device: torch.device, seed: int):
    """Ours with random weights and transformers' Qwen3_5(Moe)ForCausalLM holding the same weights, both in `dtype` with
    fp32 rotary frequencies, as `qwen35.load_pretrained` and transformers' from_pretrained load a checkpoint."""
    if device.type == "cpu":
        force_torch_path()  # fla's and causal_conv1d's kernels, which transformers binds when importable, need CUDA
    torch.manual_seed(seed)
    with torch.device(device):
        ours = qwen35.Qwen35ForCausalLM(config).to(dtype).eval()
        ours.model.rotary_emb.reset_parameters()
        hf_class = transformers.Qwen3_5MoeForCausalLM if config.is_moe else transformers.Qwen3_5ForCausalLM
        hf = hf_class._from_config(hf_text_config(config), dtype=dtype).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    # EOS off: min_new_tokens would instead mask EOS out of the logits and change greedy picks where ours, with
    # eos_token_id=[], takes EOS as an ordinary token.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = PAD
    return ours, hf


def transformers_kernels(hf) -> str:
    """The package whose code each of the delta-rule and causal-conv entry points of `hf`'s modeling module runs:
    transformers binds fla's and causal_conv1d's kernels where they import, else keeps its own torch code."""
    modeling = sys.modules[type(hf).__module__]
    bound = []
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                 "causal_conv1d_update"):
        fn = getattr(modeling, name)
        implementation = inspect.getclosurevars(fn).nonlocals.get("implementation", fn)
        bound.append(f"{name.removeprefix('torch_')} {implementation.__module__.split('.')[0]}")
    return ", ".join(bound)


def gsm8k_shaped_batch(batch: int, min_prompt: int, max_prompt: int, vocab: int, seed: int, device):
    """Left-padded random prompts with lengths uniform in [min_prompt, max_prompt]: (input_ids, padding_mask)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_prompt, max_prompt + 1, (batch,), generator=gen)
    width = int(lengths.max())
    input_ids = torch.full((batch, width), PAD, dtype=torch.long)
    padding_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, width - length:] = torch.randint(1, vocab, (length,), generator=gen)
        padding_mask[row, width - length:] = 1
    return input_ids.to(device), padding_mask.to(device)


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--flavor", choices=list(qwen35.FLAVORS), default="0.8B")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--min-prompt", type=int, default=60)
    parser.add_argument("--max-prompt", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled row (its compile is slow on CPU)")
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if not 1 <= args.min_prompt <= args.max_prompt:
        parser.error("need 1 <= --min-prompt <= --max-prompt")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available: run with --device cpu (and a small --flavor such as debug)")

    config = qwen35.Qwen35Config.from_flavor(args.flavor)
    ours, hf = build_models(config, dtype, device, args.seed)
    hf_note = transformers_kernels(hf)
    input_ids, padding_mask = gsm8k_shaped_batch(args.batch, args.min_prompt, args.max_prompt, config.vocab_size,
                                                 args.seed, device)
    prompt_width, new = input_ids.shape[1], args.new_tokens

    def ours_decode(compile: bool):
        return lambda: qwen35.generate(ours, input_ids, new, padding_mask=padding_mask, eos_token_id=[],
                                       compile=compile)

    # the eager runs first: their warm-up pays the device's and the prefill kernels' first-use costs, so that
    # the compiled run's first call minus its median is the compile
    runs = {"ours eager": ours_decode(False),
            "transformers": lambda: hf.generate(input_ids, attention_mask=padding_mask, max_new_tokens=new,
                                                do_sample=False)}
    skipped = "--no-compile" if args.no_compile else decode_compile_unsupported(ours)
    if skipped is None:
        runs["ours compiled"] = ours_decode(True)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; {args.dtype}")
    print(f"flavor {args.flavor}: {n_params / 1e6:.1f} M parameters, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, vocab {config.vocab_size}, "
          f"{'MoE' if config.is_moe else 'dense'}")
    print(f"transformers runs: {hf_note}; attention {hf.config._attn_implementation}")
    print(f"batch {args.batch} left-padded prompts of {args.min_prompt}-{args.max_prompt} tokens (padded width "
          f"{prompt_width}, {int(padding_mask.sum())} prompt tokens), {new} new tokens each, greedy, EOS off; "
          f"1 warm-up + {args.repeats} interleaved repeats")
    if skipped is not None:
        print(f"ours compiled: skipped ({skipped})")

    first_call = {}
    for name, run in runs.items():
        first_call[name], _ = timed(run, device)
        print(f"{name}: first call (warm-up{', compile' if name == 'ours compiled' else ''}) "
              f"{first_call[name]:.2f} s", flush=True)
    seconds, outputs = {name: [] for name in runs}, {}
    graphs = torch._dynamo.utils.counters["stats"]
    graphs_before = graphs["unique_graphs"]
    for repeat in range(args.repeats):
        for name, run in runs.items():
            elapsed, outputs[name] = timed(run, device)
            seconds[name].append(elapsed)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{name} {times[-1]:.2f} s" for name, times in seconds.items()),
              flush=True)
    recompiled = graphs["unique_graphs"] - graphs_before
    for name, out in outputs.items():  # a row stopping early would make the times incomparable
        assert out.shape == (args.batch, prompt_width + new), (name, tuple(out.shape))

    median = {name: statistics.median(times) for name, times in seconds.items()}
    generated = {name: out[:, prompt_width:] for name, out in outputs.items()}
    results = {}
    print(f"\n{'':14s} {'s / batch':>10s} {'(min-max)':>15s} {'questions/s':>12s} {'tokens/s':>10s} "
          f"{'vs transformers':>16s} {'agreement':>10s}")
    for name in sorted(runs, key=["ours compiled", "ours eager", "transformers"].index):
        r = results[name] = dict(seconds=seconds[name], median_s=median[name], first_call_s=first_call[name],
                                 questions_per_s=args.batch / median[name],
                                 tokens_per_s=args.batch * new / median[name],
                                 speedup_vs_transformers=median["transformers"] / median[name])
        agreement = ""
        if name != "transformers":
            r["agreement_with_transformers"] = (generated[name] == generated["transformers"]).float().mean().item()
            agreement = f"{r['agreement_with_transformers']:.4f}"
        spread = f"{min(seconds[name]):.3f}-{max(seconds[name]):.3f}"
        print(f"{name:14s} {r['median_s']:10.3f} {spread:>15s} {r['questions_per_s']:12.2f} "
              f"{r['tokens_per_s']:10.0f} {r['speedup_vs_transformers']:15.2f}x {agreement:>10s}")
    compile_s = None
    if "ours compiled" in runs:
        compile_s = first_call["ours compiled"] - median["ours compiled"]
        print(f"compile (first compiled call minus the median): {compile_s:.1f} s; graphs compiled during the "
              f"timed repeats: {recompiled} (0 expected: a recompile per batch would be in every eval batch's time)")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (both models together)")
    print("vs transformers = its seconds per batch / these (questions/s ratio); agreement = fraction of generated "
          "tokens equal to transformers'")
    if args.out is not None:
        args.out.write_text(json.dumps(dict(
            device=device_name, torch=torch.__version__, transformers=transformers.__version__, dtype=args.dtype,
            flavor=args.flavor, parameters=n_params, transformers_kernels=hf_note, batch=args.batch,
            prompt_tokens=[args.min_prompt, args.max_prompt], new_tokens=new, repeats=args.repeats,
            compile_s=compile_s, graphs_compiled_in_repeats=recompiled, compiled_skipped=skipped,
            results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
