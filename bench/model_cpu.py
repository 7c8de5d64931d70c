"""Our model vs transformers' Qwen3.5 (torch path) on the same CPU, threads and weights, in one run.

    python bench/model_cpu.py [--threads 2] [--seq 2048] [--repeats 3] [--decode-only]

Prints tokens/s of a training step (forward + backward), of prefill and of decode, and ours / transformers, for
our model in eager mode and compiled (torch.compile fullgraph, inductor; compile time excluded by a warm-up and
printed separately for decode). Decode is greedy `qwen35.generate` with eager steps (compile=False) and with
compiled steps (compile=True, one graph per step on CPU), against transformers' greedy `generate`, repeats interleaved
so that a change of machine load hits all three. transformers runs eagerly on its torch path (its delta-rule
fallback is what it ships for CPU). Interleaved with them, the weight-streaming floor of a decode step: one
matrix-vector product with each of the step's weight matrices (every linear layer and lm_head), which any batch-1
decoder must at least do; transformers' step time over it bounds the ratio any implementation reaches here.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import qwen35  # noqa: E402
from hf_oracle import hf_causal_lm  # noqa: E402

CONFIG = qwen35.Qwen35Config(
    hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
    intermediate_size=1536, vocab_size=4096, mrope_section=[4, 2, 2], eos_token_id=0,
)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=16, help="prompt length for the decode measurement")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", type=Path, default=Path("outputs/bench-model-cpu"))
    parser.add_argument("--decode-only", action="store_true", help="skip the training step and prefill")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf = hf_causal_lm(CONFIG)
    hf.save_pretrained(args.tmp)
    ours = qwen35.load_pretrained(args.tmp)
    ids = torch.randint(1, CONFIG.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    prompt = ids[:, :args.prompt]
    with torch.no_grad():
        diff = (ours(ids[:, :256]) - hf(ids[:, :256]).logits).abs().max().item()

    def train_step(model, logits_of):
        def step():
            model.zero_grad(set_to_none=True)
            logits = logits_of(model(ids))
            torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
        return step

    def prefill(model, logits_of):
        def run():
            with torch.no_grad():
                logits_of(model(ids))
        return run

    def decode_hf():
        hf.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def decode_ours(compile):
        return lambda: qwen35.generate(ours, prompt, args.new_tokens, eos_token_id=[], compile=compile)

    weights = [m.weight for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    vectors = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def weight_streaming_floor():
        for _ in range(args.new_tokens):
            for w in weights:
                torch.nn.functional.linear(vectors[w.shape[1]], w)

    compiled = torch.compile(ours, fullgraph=True)
    identity = lambda x: x  # noqa: E731
    hf_logits = lambda o: o.logits  # noqa: E731
    measurements = [] if args.decode_only else [
        ("train step (fwd+bwd)", args.seq, train_step(ours, identity), train_step(hf, hf_logits)),
        ("  compiled", args.seq, train_step(compiled, identity), None),
        ("prefill", args.seq, prefill(ours, identity), prefill(hf, hf_logits)),
        ("  compiled", args.seq, prefill(compiled, identity), None),
    ]
    rows = []
    ours.eval(), hf.eval()
    eager_decode, compiled_decode = decode_ours(False), decode_ours(True)
    decode_hf()  # warm-up
    eager_seconds = timed(eager_decode, 1)
    start = time.perf_counter()
    compiled_decode()
    compile_seconds = time.perf_counter() - start - eager_seconds
    weight_streaming_floor()  # warm-up
    decode_times = {"hf": [], "eager": [], "compiled": [], "floor": []}
    for _ in range(args.repeats):
        for name, fn in (("hf", decode_hf), ("eager", eager_decode), ("compiled", compiled_decode),
                         ("floor", weight_streaming_floor)):
            start = time.perf_counter()
            fn()
            decode_times[name].append(time.perf_counter() - start)
    decode_tps = {name: args.new_tokens / statistics.median(times) for name, times in decode_times.items()}
    for name, tokens, ours_fn, hf_fn in measurements:
        if name.startswith("train"):
            ours.train(), hf.train()
        elif name == "prefill":
            ours.eval(), hf.eval()
        hf_tps = tokens / timed(hf_fn, args.repeats) if hf_fn is not None else rows[-1][2]
        rows.append((name, tokens / timed(ours_fn, args.repeats), hf_tps))

    print(f"config: hidden {CONFIG.hidden_size}, {CONFIG.num_hidden_layers} layers, vocab {CONFIG.vocab_size}, "
          f"seq {args.seq}, fp32, {args.threads} threads, torch {torch.__version__}; max |logit diff| {diff:.2e}")
    print(f"{'measurement':24s} {'ours tok/s':>12s} {'transformers tok/s':>20s} {'ratio':>8s}")
    rows += [("decode, eager steps", decode_tps["eager"], decode_tps["hf"]),
             ("  compiled steps", decode_tps["compiled"], decode_tps["hf"])]
    for name, ours_tps, hf_tps in rows:
        print(f"{name:24s} {ours_tps:12.1f} {hf_tps:20.1f} {ours_tps / hf_tps:7.2f}x")
    spread = {name: f"{min(t) * 1e3 / args.new_tokens:.2f}-{max(t) * 1e3 / args.new_tokens:.2f}"
              for name, t in decode_times.items()}
    print(f"decode ms/token over {args.repeats} repeats (min-max): transformers {spread['hf']}, eager "
          f"{spread['eager']}, compiled {spread['compiled']}; compile (first compiled call minus an eager one) "
          f"{compile_seconds:.1f} s")
    weight_mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(f"weight-streaming floor: {len(weights)} matrix-vector products over {weight_mb:.1f} MB per token take "
          f"{spread['floor']} ms/token, so no batch-1 decoder here can exceed "
          f"{decode_tps['floor'] / decode_tps['hf']:.2f}x transformers")


if __name__ == "__main__":
    main()
