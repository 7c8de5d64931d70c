"""Greedy decoding with and without MTP speculation on the debug flavor, in one run.

    python bench/speculative_cpu.py [--threads 2] [--train-steps 200] [--new-tokens 64] [--batch 1] [--repeats 5]
                                    [--compile]

Trains the debug model and its MTP head briefly on the debug corpus (pydoc's language-reference topics as bytes,
main + MTP loss), then decodes the same prompts plainly and with `speculative="mtp"` (checking the outputs are
identical; median of interleaved repeats) and prints tokens/s of both, their ratio and the MTP acceptance rate.
--compile: both decode with compiled steps (`generate(compile=True)`; compile time excluded by the
warm-up).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from pydoc_data.topics import topics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import qwen35  # noqa: E402
from mtp_training import corpus_windows, train_with_mtp  # noqa: E402
from qwen35.decoding import SpeculationStats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="compiled decode steps in both runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = torch.tensor(list("\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.long)
    model = qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config.from_flavor("debug", mtp_num_hidden_layers=1))
    start = time.perf_counter()
    main_loss, mtp_loss = train_with_mtp(model, lambda g: corpus_windows(data, 8, 128, g), args.train_steps, lr=2e-3)
    print(f"trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s: main loss {main_loss:.2f}, "
          f"MTP loss {mtp_loss:.2f}")
    prompts = torch.stack([data[s:s + 32] for s in range(1000, 1000 + 4000 * args.batch, 4000)])

    def run(**kwargs):
        start = time.perf_counter()
        out = qwen35.generate(model, prompts, args.new_tokens, eos_token_id=[], compile=args.compile, **kwargs)
        return out, time.perf_counter() - start

    run(), run(speculative="mtp")  # warm-up
    times_plain, times_spec = [], []
    for _ in range(args.repeats):  # interleaved, so that a change of machine load hits both
        plain, seconds = run()
        times_plain.append(seconds)
        stats = SpeculationStats()
        spec, seconds = run(speculative="mtp", stats=stats)
        times_spec.append(seconds)
        assert torch.equal(plain, spec), "speculative output differs from greedy"
    t_plain, t_spec = statistics.median(times_plain), statistics.median(times_spec)
    tokens = args.batch * args.new_tokens
    print(f"debug flavor, fp32, {'compiled' if args.compile else 'eager'} steps, batch {args.batch}, "
          f"{args.new_tokens} new tokens, {args.threads} threads, torch {torch.__version__}")
    print(f"plain greedy   {tokens / t_plain:8.1f} tok/s")
    print(f"MTP speculative {tokens / t_spec:7.1f} tok/s   ratio {t_plain / t_spec:.2f}x   acceptance "
          f"{stats.acceptance_rate:.0%} ({stats.accepted}/{stats.drafted}), {stats.verify_steps} verification steps")


if __name__ == "__main__":
    main()
