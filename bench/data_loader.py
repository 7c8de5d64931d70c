"""Pretraining data-loader throughput per rank at 1, 2 and 4 data-parallel ranks: this checkout against a baseline
checkout (e.g. the commit before the unit-sharded reader), on the same parquet set, in one run.

    python bench/data_loader.py --baseline <checkout dir> [--megabytes 200] [--batches 40] [--threads 1]

The set (the standard library's docstrings, repeated with a varying prefix to ~200 MB, 8 parquet files, row groups
of 1,000 rows) is made once under outputs/bench_data. Each measurement runs in a fresh process (PYTHONPATH = the
checkout) as rank 0 of W: Qwen35DataLoader batches of 8 windows of 2,048 tokens (the debug tokenizer), timed from
construction (footers, the first reads) to the last batch. Ranks are symmetric, so rank 0 stands for each rank.
Prints documents/s and tokens/s per rank (median of --repeats processes), the parquet rows the rank decoded (counted)
and per document it used, and this checkout / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "outputs" / "bench_data"
SEQ_LEN, BATCH = 2048, 8


def make_parquet_set(megabytes: int) -> Path:
    """~megabytes of text in 8 parquet files (made once; reused while the size matches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from torchtitan_ext.debug_assets import shuffled_stdlib_documents

    directory = DATA / f"parquet_{megabytes}mb"
    if (directory / "done").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    docs = shuffled_stdlib_documents()
    per_file = megabytes * 2**20 // 8
    n = 0
    for f in range(8):
        texts, size = [], 0
        while size < per_file:
            text = f"copy {n // len(docs)}: {docs[n % len(docs)]}"
            texts.append(text)
            size += len(text.encode())
            n += 1
        pq.write_table(pa.table({"text": texts}), directory / f"part-{f}.parquet", row_group_size=1000)
    (directory / "done").write_text(str(n))
    return directory


def measure(world: int, batches: int, data: Path) -> dict:
    """In this process (the checkout on PYTHONPATH): rank 0 of `world`; also the parquet rows it decoded."""
    import time

    import pyarrow.parquet as pq

    import torchtitan_ext  # noqa: F401
    from torchtitan_ext.data import Qwen35DataLoader, SourceSpec, TitanTokenizer
    from torchtitan_ext.debug_assets import ensure_stdlib_assets
    from qwen35 import Qwen35Config

    assets = REPO / "outputs" / "debug_assets"
    ensure_stdlib_assets(assets / "stdlib_docs.jsonl", assets, Qwen35Config.from_flavor("debug").vocab_size)
    tokenizer = TitanTokenizer(TitanTokenizer.Config(), tokenizer_path=str(assets))
    decoded = []
    read_row_group = pq.ParquetFile.read_row_group

    def counted(self, group, **kwargs):
        table = read_row_group(self, group, **kwargs)
        decoded.append(table.num_rows)
        return table

    pq.ParquetFile.read_row_group = counted
    start = time.perf_counter()
    loader = Qwen35DataLoader(Qwen35DataLoader.Config(sources=[SourceSpec(str(data))]), dp_world_size=world,
                              dp_rank=0, tokenizer=tokenizer, seq_len=SEQ_LEN, local_batch_size=BATCH)
    iterator = iter(loader)
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return {"documents": loader.dataset.documents_read, "tokens": batches * BATCH * SEQ_LEN, "seconds": seconds,
            "rows_decoded": sum(decoded)}


def run(checkout: Path, world: int, batches: int, data: Path, threads: int, repeats: int) -> dict:
    """The run with the median time of `repeats` fresh processes."""
    runs = sorted((run_once(checkout, world, batches, data, threads) for _ in range(repeats)),
                  key=lambda r: r["seconds"])
    return runs[len(runs) // 2]


def run_once(checkout: Path, world: int, batches: int, data: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(threads),
               RAYON_NUM_THREADS=str(threads))  # the tokenizers library's pool
    code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'bench')!r}); from data_loader import measure; "
            f"from pathlib import Path; print(json.dumps(measure({world}, {batches}, Path({str(data)!r}))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{checkout}, {world} ranks failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout to compare with")
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    data = make_parquet_set(args.megabytes)
    size = sum(p.stat().st_size for p in data.glob("*.parquet")) / 2**20
    print(f"{data}: {size:.0f} MB parquet, {(data / 'done').read_text()} documents; {args.batches} batches of "
          f"{BATCH} x {SEQ_LEN} tokens per rank, {args.threads} thread(s)")
    print(f"{'ranks':>5} {'checkout':>9} {'docs/s/rank':>12} {'tokens/s/rank':>14} {'seconds':>8} "
          f"{'rows decoded':>13} {'rows/doc':>9}")
    for world in (1, 2, 4):
        results = {}
        for name, checkout in (("baseline", args.baseline), ("this", REPO)):
            r = results[name] = run(checkout, world, args.batches, data, args.threads, args.repeats)
            print(f"{world:>5} {name:>9} {r['documents'] / r['seconds']:>12,.0f} "
                  f"{r['tokens'] / r['seconds']:>14,.0f} {r['seconds']:>8.1f} {r['rows_decoded']:>13,} "
                  f"{r['rows_decoded'] / r['documents']:>9.2f}")
        this, baseline = results["this"], results["baseline"]
        print(f"{world:>5} {'this/base':>9} {'':>12} {baseline['seconds'] / this['seconds']:>13.2f}x {'':>8} "
              f"{this['rows_decoded'] / baseline['rows_decoded']:>12.2f}x")


if __name__ == "__main__":
    main()
