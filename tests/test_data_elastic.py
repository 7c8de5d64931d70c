"""Resuming at another world size: the ranks' read states of a run on W data-parallel ranks, merged into the global
position a checkpoint holds, continue on W' ranks (2 -> 1, 2 -> 4, 1 -> 2, and 2 -> 4 -> 3). The document ids read
are logged: over the whole run none is read twice and none is skipped (the ids read are exactly the documents of the
units the final global position calls consumed, checked against the source read in order on one rank), and every
token of every document read is trained on exactly once (label counts conserved, pending tokens included). SFT:
the windows consumed across a resume are exactly those of an uninterrupted run on the final world size."""

import json
import pickle
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan_ext.data.position import GlobalPosition
from torchtitan_ext.data.pretrain import PretrainWindows
from torchtitan_ext.data.sft import SFTSamples, SFTWindows
from torchtitan_ext.data.sources import JsonLinesReader, SourceSpec, SourceStream, open_reader
from torchtitan_ext.debug_assets import CHAT_TEMPLATE, byte_level_tokenizer

EOS = 0
SEED, T, WINDOWS = 3, 32, 12  # shuffle seed, seq_len, windows a rank takes before and after a resume


@pytest.fixture(scope="module")
def tokenizer():
    return Qwen35Tokenizer(byte_level_tokenizer())  # one token a byte


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A parquet source (4 files, row groups of 5: 40 units) and a JSON-lines one (blocks of 96 bytes), documents
    "<id> words..." of 1 to 12 words; {id: text}."""
    root = tmp_path_factory.mktemp("elastic")
    rng = random.Random(0)
    texts = {i: f"{i} " + " ".join(rng.choice(["ab", "cde", "fghi", "j"]) for _ in range(rng.randint(1, 12)))
             for i in list(range(200)) + list(range(1000, 1080))}
    (root / "pq").mkdir()
    for f in range(4):
        ids = range(50 * f, 50 * f + 50)
        pq.write_table(pa.table({"text": [texts[i] for i in ids], "other": list(ids)}), root / "pq" / f"{f}.parquet",
                       row_group_size=5)
    (root / "b.jsonl").write_text("".join(json.dumps({"text": texts[i]}) + "\n" for i in range(1000, 1080)))
    specs = [SourceSpec(str(root / "pq"), weight=2.0), SourceSpec(str(root / "b.jsonl"))]
    return specs, texts


@pytest.fixture(autouse=True)
def read_log(monkeypatch):
    """Every document id a source hands out, in order."""
    monkeypatch.setattr(JsonLinesReader, "BLOCK_BYTES", 96)
    log = []
    original = SourceStream.__next__

    def logged(self):
        record, where = original(self)
        log.append(int(record["text"].split()[0]))
        return record, where

    monkeypatch.setattr(SourceStream, "__next__", logged)
    return log


def _ranks(specs, tokenizer, world, packing=True):
    return [PretrainWindows([SourceStream(open_reader(s, ("text",)), rank, world, SEED) for s in specs], tokenizer, T,
                            packing=packing, documents_per_read=2) for rank in range(world)]


def _take_windows(datasets, n):
    iterators = [iter(d) for d in datasets]
    return [next(it) for _ in range(n) for it in iterators]


def _checkpoint(datasets):
    return pickle.loads(pickle.dumps(PretrainWindows.merge_rank_states([d.rank_state() for d in datasets])))


def _resume(specs, tokenizer, world, state, packing=True):
    datasets = _ranks(specs, tokenizer, world, packing)
    for d in datasets:
        d.load_global_state(state)
    return datasets


def _consumed_by_position(spec, position):
    """The ids a global position calls consumed, from the source read in order on one rank (items 0, 1, ...)."""
    reference = SourceStream(open_reader(spec, ("text",)), 0, 1, SEED)
    by_item: dict[int, list[int]] = {}
    last = max([position.frontier, *position.done, *position.partial])
    while (record := next(reference)[0]) and reference.cursor.item() <= last:
        by_item.setdefault(reference.cursor.item(), []).append(int(record["text"].split()[0]))
    return ([i for item in range(position.frontier) for i in by_item.get(item, [])]
            + [i for item in position.done for i in by_item.get(item, [])]
            + [i for item, n in position.partial.items() for i in by_item.get(item, [])[:n]])


def _trained_labels(windows):
    return sum(int((labels != IGNORE_INDEX).sum()) for _, labels, _ in windows)


def _leftover_labels(state):
    """Tokens still pending that will be labels: those not following an <|endoftext|> (the first pending token of
    a rank was its last window's last label already)."""
    return sum(sum(1 for a in pending[:-1] if a != EOS) for pending in state["pending"])


@pytest.mark.parametrize("worlds, packing", [((2, 1), True), ((2, 4), True), ((1, 2), True), ((2, 4, 3), True),
                                             ((2, 4, 3), False)])
def test_resume_on_another_world_size_reads_every_document_once(corpus, tokenizer, read_log, worlds, packing):
    specs, texts = corpus
    datasets = _ranks(specs, tokenizer, worlds[0], packing)
    windows = _take_windows(datasets, WINDOWS)
    for world in worlds[1:]:
        state = _checkpoint(datasets)
        datasets = _resume(specs, tokenizer, world, state, packing)
        windows += _take_windows(datasets, WINDOWS)
    final = PretrainWindows.merge_rank_states([d.rank_state() for d in datasets])
    read = list(read_log)
    print(f"worlds {worlds}: {len(read)} documents read, ids {read}")
    assert len(read) == len(set(read)), "a document was read twice"
    assert len(read) < len(texts)  # all within the first epoch, so a repeat would be a duplicate
    # no gap: exactly the documents the final global position calls consumed (the merged position of the ranks)
    merged = [GlobalPosition(**p).merge(progress) for p, progress in zip(final["positions"], final["progress"])]
    expected = [i for spec, position in zip(specs, merged) for i in _consumed_by_position(spec, position)]
    assert sorted(read) == sorted(expected)
    if not packing:  # the label accounting below is that of packed windows
        return
    # every token read is trained on once: labels emitted + labels still pending == tokens of the documents read
    # that follow another token of their document (a document's first token follows an <|endoftext|>: ignored)
    document_labels = sum(len(tokenizer.encode(texts[i])) for i in read)  # n tokens + EOS -> n labels
    assert _trained_labels(windows) + _leftover_labels(final) == document_labels


def test_uninterrupted_run_on_the_final_world_size_reads_the_same_prefix(corpus, tokenizer, read_log):
    """The global stream does not depend on the world size: the documents of the units below the smaller frontier
    are read both by a 2 -> 4 run and by an uninterrupted 4-rank run of as many windows."""
    specs, _ = corpus

    def frontier_ids(datasets):
        state = _checkpoint(datasets)
        return [GlobalPosition(**p).merge(progress).frontier for p, progress in zip(state["positions"],
                                                                                     state["progress"])]

    datasets = _ranks(specs, tokenizer, 2)
    _take_windows(datasets, 2 * WINDOWS)
    datasets = _resume(specs, tokenizer, 4, _checkpoint(datasets))
    _take_windows(datasets, WINDOWS)
    resumed_ids, resumed_frontiers = set(read_log), frontier_ids(datasets)
    read_log.clear()
    uninterrupted = _ranks(specs, tokenizer, 4)
    _take_windows(uninterrupted, 2 * WINDOWS)
    uninterrupted_ids, uninterrupted_frontiers = set(read_log), frontier_ids(uninterrupted)
    for spec, a, b in zip(specs, resumed_frontiers, uninterrupted_frontiers):
        prefix = set(_consumed_by_position(spec, GlobalPosition(min(a, b))))
        assert len(prefix) > 10 and prefix <= resumed_ids and prefix <= uninterrupted_ids


@pytest.mark.parametrize("worlds", [(2, 3), (3, 1)])
def test_sft_resume_on_another_world_size_continues_the_same_windows(tmp_path, worlds):
    """SFT ranks move in step, so the windows consumed over a W -> W' run are exactly those of an uninterrupted
    run on W' ranks of as many windows (the first 6 W + 6 W' of the global sequence)."""
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(14)))
    samples = SFTSamples([SourceSpec(str(path))], Qwen35Tokenizer(byte_level_tokenizer(), chat_template=CHAT_TEMPLATE),
                         seq_len=128)

    def ranks(world):
        return [SFTWindows(samples, 128, rank, world, packing=False) for rank in range(world)]

    def take(datasets, n):
        iterators = [iter(d) for d in datasets]
        return [tuple(next(it)[0].tolist()) for _ in range(n) for it in iterators]

    first = ranks(worlds[0])
    consumed = take(first, 6)
    state = pickle.loads(pickle.dumps(SFTWindows.merge_rank_states([d.rank_state() for d in first])))
    resumed = ranks(worlds[1])
    for d in resumed:
        d.load_global_state(state)
    consumed += take(resumed, 6)
    print(f"SFT worlds {worlds}: windows (first tokens) {[w[:12] for w in consumed]}")
    n = 6 * worlds[0] + 6 * worlds[1]
    assert len(consumed) == n and n % worlds[1] == 0
    assert sorted(consumed) == sorted(take(ranks(worlds[1]), n // worlds[1]))
    assert len(set(consumed[:14])) == 14  # the first epoch: 14 samples, one a window


# ------------------------------------------------------------------------- through the trainer (2 -> 1 processes)


def _data_position(step_dir):
    import torch.distributed.checkpoint as dcp

    state = {"dataloader": {"global_data_position": b""}}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    return pickle.loads(state["dataloader"]["global_data_position"])


def test_trainer_checkpoint_from_two_processes_resumes_on_one(tmp_path):
    """torchrun, 2 FSDP processes, 3 steps, a full checkpoint; then 1 process resumes it (steps 4, 5). The saved
    data position is one for both ranks (gathered over gloo); the 1-process run starts from the merge of the two
    ranks' progress and its own checkpoint continues from there."""
    import os
    import subprocess
    import sys

    from test_train_helpers import REPO, debug_args, debug_assets, scalars, train

    debug_assets()
    common = ("--training.seq_len", "64", "--lr_scheduler.warmup_steps", "1", "--checkpoint.enable", "true",
              "--checkpoint.interval", "3", "--checkpoint.last_save_model_only", "false", "--data.shuffle_seed", "5")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend", "c10d",
               "--rdzv_endpoint=localhost:0", "-m", "torchtitan_ext.train",
               *debug_args(tmp_path, *common, "--training.steps", "3", "--training.local_batch_size", "2")]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    saved = _data_position(tmp_path / "checkpoint" / "step-3")
    assert len(saved["data"]["pending"]) == 2 and all(saved["data"]["pending"])  # both ranks' state, one entry
    train(tmp_path, *common, "--training.steps", "5", "--training.local_batch_size", "4",
          "--metrics.save_tb_folder", "tb_resumed")
    assert sorted(scalars(tmp_path, "tb_resumed")["loss_metrics/global_avg_loss"]) == [4, 5]
    resumed = _data_position(tmp_path / "checkpoint" / "step-5")["data"]
    merged = [GlobalPosition(**p).merge(progress) for p, progress in zip(saved["data"]["positions"],
                                                                        saved["data"]["progress"])]
    assert [GlobalPosition(**p) for p in resumed["positions"]] == merged and len(resumed["pending"]) == 1
    # token accounting across the resume: the 2 x 4 windows of 64 the one process trained on came from the two
    # ranks' unfinished tokens plus what it read since
    read_since = sum(resumed["tokens_read"][0]) - sum(map(sum, saved["data"]["tokens_read"]))
    assert len(resumed["pending"][0]) + 2 * 4 * 64 == sum(map(len, saved["data"]["pending"])) + read_since
