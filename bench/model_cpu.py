"""Our model vs transformers' Qwen3.5 (torch path) on the same CPU, threads and weights, in one run.

    python bench/model_cpu.py [--threads 2] [--seq 2048] [--repeats 3]

Prints tokens/s of a training step (forward + backward), of prefill and of decode, and ours / transformers.
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

    def decode_ours():
        qwen35.generate(ours, prompt, args.new_tokens, eos_token_id=[])

    rows = []
    for name, tokens, ours_fn, hf_fn in [
        ("train step (fwd+bwd)", args.seq, train_step(ours.train(), lambda x: x), train_step(hf.train(), lambda o: o.logits)),
        ("prefill", args.seq, prefill(ours.eval(), lambda x: x), prefill(hf.eval(), lambda o: o.logits)),
        ("decode", args.new_tokens, decode_ours, decode_hf),
    ]:
        t_ours, t_hf = timed(ours_fn, args.repeats), timed(hf_fn, args.repeats)
        rows.append((name, tokens / t_ours, tokens / t_hf))

    print(f"config: hidden {CONFIG.hidden_size}, {CONFIG.num_hidden_layers} layers, vocab {CONFIG.vocab_size}, "
          f"seq {args.seq}, fp32, {args.threads} threads, torch {torch.__version__}; max |logit diff| {diff:.2e}")
    print(f"{'measurement':24s} {'ours tok/s':>12s} {'transformers tok/s':>20s} {'ratio':>8s}")
    for name, ours_tps, hf_tps in rows:
        print(f"{name:24s} {ours_tps:12.1f} {hf_tps:20.1f} {ours_tps / hf_tps:7.2f}x")


if __name__ == "__main__":
    main()
