"""Pretraining windows, checked against the documents tokenized directly: packing (the token stream, labels,
document starts), packing off (one document per window, padding), token-weighted mixing, resume, the
data-parallel split, `collate`'s cu_seqlens, and the torchtitan dataloader's state_dict round trip."""

import json
import pickle
import random

import pytest
import torch

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan_ext.data import Qwen35DataLoader, SourceSpec, TitanTokenizer, collate
from torchtitan_ext.data.pretrain import PretrainWindows
from torchtitan_ext.data.sources import DataError, JsonLinesReader, SourceStream, open_reader
from torchtitan_ext.debug_assets import byte_level_tokenizer, train_byte_level_bpe

EOS = 0  # <|endoftext|> in both test tokenizers
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial "
         "buyer of mixed grape juice and packing boxes with liquor").split()


def _documents(n, prefix, seed, long_every=0):
    """n distinct documents of 1 to ~30 words (every `long_every`-th one ~120 words)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = rng.randint(1, 30) if not (long_every and i % long_every == long_every - 1) else 120
        docs.append(f"{prefix}{i} " + " ".join(rng.choice(WORDS) for _ in range(words)))
    return docs


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE (with merges) trained here with the project's recipe; ids 0-2 are the specials."""
    directory = tmp_path_factory.mktemp("tokenizer")
    train_byte_level_bpe(_documents(200, "w", seed=1), directory, vocab_size=400)
    tokenizer = Qwen35Tokenizer.from_dir(directory)
    assert tokenizer.end_of_text_id == EOS and len(tokenizer.encode("the quick brown fox")) < len("the quick brown fox")
    return tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer():
    """One token per UTF-8 byte: a document of n bytes is n tokens + <|endoftext|>."""
    tokenizer = Qwen35Tokenizer(byte_level_tokenizer())
    assert tokenizer.end_of_text_id == EOS
    return tokenizer


def _jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def _windows(specs, tokenizer, seq_len, packing=True, rank=0, world=1, documents_per_read=64, seed=None):
    sources = [SourceStream(open_reader(spec, (spec.text_field,)), rank, world, seed) for spec in specs]
    return PretrainWindows(sources, tokenizer, seq_len, packing=packing, documents_per_read=documents_per_read)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _tokens(tokenizer, docs, epochs=1):
    """The documents tokenized directly, each followed by <|endoftext|>, `epochs` times over."""
    return [t for _ in range(epochs) for doc in docs for t in tokenizer.encode(doc) + [EOS]]


def _stream(windows):
    """The token stream a run of packed windows covers: window k holds stream[kT : kT + T + 1], its inputs and its
    last token, which must be the next window's first input (the last token is the last label, or, where that label
    is ignored because the last input is an <|endoftext|>, known only from the next window)."""
    stream = []
    for inputs, labels, _ in windows:
        inputs = inputs.tolist()
        if stream:
            assert stream[-1] in (None, inputs[0]), "consecutive windows overlap by one token"
            stream.pop()
        last = labels[-1].item()
        stream += inputs + [None if last == IGNORE_INDEX else last]
    return stream[:-1] if stream[-1] is None else stream


def _split_documents(stream):
    """The complete (<|endoftext|>-terminated) documents of a token stream, as tuples including the EOS."""
    docs, current = [], []
    for token in stream:
        current.append(token)
        if token == EOS:
            docs.append(tuple(current))
            current = []
    return docs


# ------------------------------------------------------------------------------------------------- packing


def _window_ends_on_eos(stream, seq_len, n_windows):
    return any(stream[(k + 1) * seq_len] == EOS for k in range(n_windows))


@pytest.mark.parametrize("documents_per_read", [1, 64])
def test_packed_windows_are_the_tokenized_documents_in_order(tmp_path, bpe, documents_per_read):
    docs = _documents(40, "d", seed=2, long_every=9)
    spec = SourceSpec(str(_jsonl(tmp_path / "docs.jsonl", docs)))
    expected = _tokens(bpe, docs, epochs=4)
    assert max(len(bpe.encode(d)) for d in docs) > 3 * 24  # a document spans several windows
    n = len(_tokens(bpe, docs)) // 24 + 5  # into the second epoch
    # a seq_len for which some window's last token is an <|endoftext|> (it is also the next window's first input)
    T = next(T for T in range(24, 64) if _window_ends_on_eos(expected, T, n))
    windows = _take(iter(_windows([spec], bpe, T, documents_per_read=documents_per_read)), n)
    for k, (inputs, labels, starts) in enumerate(windows):
        assert inputs.dtype == labels.dtype == torch.int64 and starts.dtype == torch.int32
        assert inputs.shape == labels.shape == (T,)
        stretch = expected[k * T:k * T + T + 1]  # consecutive windows overlap by one token
        assert inputs.tolist() == stretch[:-1], f"window {k}"
        assert labels.tolist() == [IGNORE_INDEX if stretch[i] == EOS else stretch[i + 1] for i in range(T)]
        assert starts.tolist() == [0] + [i for i in range(1, T) if stretch[i - 1] == EOS]
    # the de-overlapped windows are the documents + <|endoftext|>, in order, every token a label once
    covered = [t for inputs, _, _ in windows for t in inputs.tolist()] + [expected[n * T]]
    assert covered == expected[:n * T + 1]
    assert _stream(windows) == expected[:n * T + 1]
    assert any(EOS in s[:-1] for s in (expected[k * T:k * T + T + 1] for k in range(n)))  # windows hold several docs


@pytest.mark.parametrize("documents_per_read", [1, 64])
def test_packed_window_ending_at_end_of_text_overlaps_the_next(tmp_path, byte_tokenizer, documents_per_read):
    """Consecutive windows overlap by one token, so every token of the stream is a label exactly once, also when a
    window's last token is an <|endoftext|> that ends the tokens read so far exactly (documents_per_read = 1)."""
    docs = ["a" * 15, "bcdefg", "hijklmnopqrs"]  # 16, 7 and 13 tokens with <|endoftext|>
    spec = SourceSpec(str(_jsonl(tmp_path / "docs.jsonl", docs)))
    expected = _tokens(byte_tokenizer, docs, epochs=3)
    T = 15  # window 0 = doc 0 + its <|endoftext|>: exactly seq_len + 1 tokens
    windows = _take(iter(_windows([spec], byte_tokenizer, T, documents_per_read=documents_per_read)), 4)
    assert windows[0][0].tolist() == expected[:T] and windows[0][1][-1].item() == EOS
    for k, (inputs, labels, starts) in enumerate(windows):
        assert inputs.tolist() == expected[k * T:k * T + T], f"window {k}"
        assert starts.tolist() == [0] + [i for i in range(1, T) if expected[k * T + i - 1] == EOS]


def test_packing_off_one_document_per_window(tmp_path, byte_tokenizer):
    T = 8
    # bytes: shorter than a window, exactly seq_len + 1 with EOS, one token over, exactly two windows, longer
    sizes = [3, 8, 9, 16, 21, 1, 7]
    docs = [chr(ord("a") + i) * n for i, n in enumerate(sizes)]
    spec = SourceSpec(str(_jsonl(tmp_path / "docs.jsonl", docs)))
    expected = []  # (inputs, labels, starts) of each window, from each document's tokens alone
    for doc in docs:
        tokens = byte_tokenizer.encode(doc) + [EOS]
        assert len(tokens) == len(doc) + 1
        offset = 0
        while True:
            piece = tokens[offset:offset + T + 1]
            n = len(piece) - 1  # content inputs
            expected.append((piece[:-1] + [EOS] * (T - n), piece[1:] + [IGNORE_INDEX] * (T - n),
                             [0] + ([n] if n < T else [])))
            if offset + T + 1 >= len(tokens):
                break
            offset += T
    assert len(expected) == 1 + 1 + 2 + 2 + 3 + 1 + 1
    windows = _take(iter(_windows([spec], byte_tokenizer, T, packing=False)), len(expected) + 2)
    got = [(i.tolist(), l.tolist(), s.tolist()) for i, l, s in windows]
    assert got[:len(expected)] == expected
    assert got[len(expected):] == expected[:2]  # next epoch
    for inputs, labels, starts in windows:  # each window's real tokens come from one document
        n = int((labels != IGNORE_INDEX).sum())
        assert len(set(inputs[:n].tolist())) == 1
        assert starts.tolist()[1:] in ([], [n])


def test_packing_off_empty_document_gives_no_empty_segment(tmp_path, byte_tokenizer):
    """A record with empty text (common in real corpora) must not make a zero-length segment: cu_seqlens with a
    repeated offset. Document starts are strictly increasing and below seq_len."""
    spec = SourceSpec(str(_jsonl(tmp_path / "docs.jsonl", ["abc", "", "de"])))
    windows = _take(iter(_windows([spec], byte_tokenizer, 6, packing=False)), 3)
    for inputs, labels, starts in windows:
        starts = starts.tolist()
        assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < 6, starts
        if len(starts) == 2:  # content, then padding with ignored labels
            assert (labels[starts[1]:] == IGNORE_INDEX).all() and (labels[:starts[1]] != IGNORE_INDEX).all()


# -------------------------------------------------------------------------------------------------- mixing


@pytest.mark.parametrize("documents_per_read, n_windows", [(1, 120), (64, 1200)])
def test_mixing_by_tokens_holds_the_weights(tmp_path, bpe, documents_per_read, n_windows):
    """Weights 3 : 1. Each read (documents_per_read documents of one source) goes to the source furthest below its
    share, so at every read boundary the tokens of source a are within one read's tokens of 3/4 of all tokens."""
    docs_a, docs_b = _documents(25, "a", seed=3), _documents(15, "b", seed=4)
    spec_a = SourceSpec(str(_jsonl(tmp_path / "a.jsonl", docs_a)), weight=3.0)
    spec_b = SourceSpec(str(_jsonl(tmp_path / "b.jsonl", docs_b)), weight=1.0)
    windows = _take(iter(_windows([spec_a, spec_b], bpe, 32, documents_per_read=documents_per_read)), n_windows)
    again = _take(iter(_windows([spec_a, spec_b], bpe, 32, documents_per_read=documents_per_read)), n_windows)
    assert all(torch.equal(x, y) for w, v in zip(windows, again) for x, y in zip(w, v))  # deterministic

    tokenized = {name: [tuple(bpe.encode(d) + [EOS]) for d in docs] for name, docs in (("a", docs_a), ("b", docs_b))}
    source_of = {doc: name for name, docs in tokenized.items() for doc in docs}
    assert len(source_of) == 40
    read = _split_documents(_stream(windows))
    runs = []  # (source, documents) of consecutive documents from one source
    for doc in read:
        if runs and runs[-1][0] == source_of[doc]:
            runs[-1][1].append(doc)
        else:
            runs.append((source_of[doc], [doc]))
    assert len(runs) > 10
    for name in "ab":  # each source's documents in its order, epoch after epoch
        mine = [doc for doc in read if source_of[doc] == name]
        assert mine == (tokenized[name] * (len(mine) // len(tokenized[name]) + 1))[:len(mine)]
    # the largest possible read: documents_per_read consecutive documents of one source (cyclically)
    one_read = max(sum(len(docs[(i + j) % len(docs)]) for j in range(documents_per_read))
                   for docs in tokenized.values() for i in range(len(docs)))
    tokens = {"a": 0, "b": 0}
    for name, docs in runs[:-1]:  # complete runs (the last one may be cut by the end of the windows)
        assert len(docs) % documents_per_read == 0  # a run is whole reads
        tokens[name] += sum(map(len, docs))
        total = tokens["a"] + tokens["b"]
        assert abs(tokens["a"] - 0.75 * total) <= one_read, (tokens, one_read)
    assert total > 20 * one_read and abs(tokens["a"] / total - 0.75) <= one_read / total


# -------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("packing, documents_per_read", [(True, 64), (True, 3), (False, 3)])
def test_resume_yields_the_same_following_windows(tmp_path, bpe, packing, documents_per_read):
    """Two sources (one with another text field); the state after every k of the first 30 windows, pickled as
    torchtitan does, resumes into exactly the following windows, also in the middle of a document."""
    docs_a, docs_b = _documents(12, "a", seed=5, long_every=5), _documents(7, "b", seed=6)
    specs = [SourceSpec(str(_jsonl(tmp_path / "a.jsonl", docs_a)), weight=2.0),
             SourceSpec(str(_jsonl(tmp_path / "b.jsonl", docs_b, field="body")), weight=1.0, text_field="body")]
    T, following = 20, 6

    def windows():
        return _windows(specs, bpe, T, packing=packing, documents_per_read=documents_per_read)

    uninterrupted = _take(iter(windows()), 30 + following)
    split_documents = 0
    for k in range(30):
        first = windows()
        _take(iter(first), k)
        state = pickle.loads(pickle.dumps(PretrainWindows.merge_rank_states([first.rank_state()])))
        assert state["pending"][0] or k == 0 or not packing  # packed: at least the next first input
        if k and uninterrupted[k - 1][1][-1].item() not in (EOS, IGNORE_INDEX):
            split_documents += 1  # the last window ended inside a document: its rest is pending
        resumed = windows()
        resumed.load_global_state(state)
        got = _take(iter(resumed), following)
        for j, (window, reference) in enumerate(zip(got, uninterrupted[k:k + following])):
            assert all(torch.equal(x, y) for x, y in zip(window, reference)), f"resumed after {k}, window {j}"
        reference = windows()
        _take(iter(reference), k + following)
        assert resumed.rank_state() == reference.rank_state()
    assert split_documents >= 10


def test_resume_checks_the_number_of_sources(tmp_path, bpe):
    spec = SourceSpec(str(_jsonl(tmp_path / "a.jsonl", ["x y z"])))
    state = PretrainWindows.merge_rank_states([_windows([spec], bpe, 8).rank_state()])
    with pytest.raises(DataError, match="the checkpoint's data state has 1 sources, the config 2"):
        _windows([spec, spec], bpe, 8).load_global_state(state)


def test_non_string_text_field_names_record(tmp_path, bpe):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 42}\n')
    with pytest.raises(DataError, match=rf"{path}:2: field 'text' is int, not a string"):
        _take(iter(_windows([SourceSpec(str(path))], bpe, 64)), 1)


def test_non_positive_weight_is_an_error(tmp_path, bpe):
    spec = SourceSpec(str(_jsonl(tmp_path / "a.jsonl", ["x"])), weight=0.0)
    with pytest.raises(DataError, match=r"source weights must be positive, got \[0\.0\]"):
        _windows([spec], bpe, 8)


# ------------------------------------------------------------------------------------------- data-parallel


def test_two_ranks_read_disjoint_documents(tmp_path, bpe, monkeypatch):
    """Unit i of the source (here blocks of 256 bytes of the file) goes to rank i % 2: each rank's documents are
    those of its units, in order, and the ranks' documents of an epoch are disjoint and cover the source."""
    monkeypatch.setattr(JsonLinesReader, "BLOCK_BYTES", 256)
    docs = _documents(30, "d", seed=7)
    spec = SourceSpec(str(_jsonl(tmp_path / "docs.jsonl", docs)))
    reader = open_reader(spec, ("text",))
    units = [[tuple(bpe.encode(r["text"]) + [EOS]) for r, _ in reader.read_unit(u)] for u in reader.units()]
    assert len(units) >= 6 and sum(units, []) == [tuple(bpe.encode(d) + [EOS]) for d in docs]
    seen = []
    for rank in range(2):
        windows = _take(iter(_windows([spec], bpe, 16, rank=rank, world=2, documents_per_read=1)), 25)
        mine = sum(units[rank::2], [])
        read = _split_documents(_stream(windows))
        assert len(read) > len(mine)
        assert read[:len(mine)] == mine
        seen.append(set(mine))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(sum(units, []))


# ------------------------------------------------------------------------------------------------- collate


def test_collate_cu_seqlens_and_shapes(tmp_path, byte_tokenizer):
    spec = SourceSpec(str(_jsonl(tmp_path / "docs.jsonl", ["abc", "defgh", "ij" * 9, "k"])))
    T = 8
    packed = _take(iter(_windows([spec], byte_tokenizer, T)), 2)
    unpacked = _take(iter(_windows([spec], byte_tokenizer, T, packing=False)), 2)  # the second one is padded
    for pair in (packed, unpacked):
        batch, labels = collate(pair)
        assert set(batch) == {"input", "cu_seqlens"}
        assert batch["input"].shape == labels.shape == (1, 2 * T) and batch["input"].dtype == torch.int64
        assert batch["input"][0].tolist() == pair[0][0].tolist() + pair[1][0].tolist()
        assert labels[0].tolist() == pair[0][1].tolist() + pair[1][1].tolist()
        expected = pair[0][2].tolist() + [s + T for s in pair[1][2].tolist()] + [2 * T]
        assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == expected
    # by hand: packed window 0 inputs = a b c EOS d e f g, window 1 = h EOS i j i j i j
    assert packed[0][2].tolist() == [0, 4] and packed[1][2].tolist() == [0, 2]
    assert collate(packed)[0]["cu_seqlens"].tolist() == [0, 4, 8, 10, 16]
    # unpacked: a b c + padding, d e f g h + padding
    assert unpacked[0][2].tolist() == [0, 3] and unpacked[1][2].tolist() == [0, 5]
    assert collate(unpacked)[0]["cu_seqlens"].tolist() == [0, 3, 8, 13, 16]


# ------------------------------------------------------------------------------------- torchtitan dataloader


@pytest.fixture(scope="module")
def titan_tokenizer(bpe):
    return TitanTokenizer(TitanTokenizer.Config(), tokenizer_path=bpe.source)


@pytest.mark.parametrize("packing", [True, False])
def test_dataloader_state_dict_round_trip_resumes_exactly(tmp_path, bpe, titan_tokenizer, packing, monkeypatch):
    """Ranks 0 and 1 of 2 in one process (the gather over processes replaced by the two loaders' states): the
    checkpointed state is one global position; loaded by both ranks, each continues with exactly its next batches,
    which are collate() of its windows."""
    specs = [SourceSpec(str(_jsonl(tmp_path / "a.jsonl", _documents(20, "a", seed=8, long_every=6))), weight=3.0),
             SourceSpec(str(_jsonl(tmp_path / "b.jsonl", _documents(9, "b", seed=9))))]
    config = Qwen35DataLoader.Config(sources=specs, packing=packing)

    def loaders():
        return [Qwen35DataLoader(config, dp_world_size=2, dp_rank=rank, tokenizer=titan_tokenizer, seq_len=16,
                                 local_batch_size=3) for rank in range(2)]

    uninterrupted = loaders()
    monkeypatch.setattr(Qwen35DataLoader, "_rank_states", lambda self: [x.dataset.rank_state() for x in uninterrupted])
    iterators = [iter(x) for x in uninterrupted]
    before = [_take(it, 4) for it in iterators]
    state = pickle.loads(pickle.dumps(uninterrupted[1].state_dict()))  # what a DCP checkpoint stores
    assert set(state) == {"global_data_position"} and state == uninterrupted[0].state_dict()  # same on all ranks
    after = [_take(it, 5) for it in iterators]
    for rank in range(2):
        windows = iter(_windows(specs, bpe, 16, packing=packing, rank=rank, world=2, seed=0))
        for inputs, labels in before[rank] + after[rank]:
            batch, batch_labels = collate(_take(windows, 3))
            assert torch.equal(inputs["input"], batch["input"]) and torch.equal(labels, batch_labels)
            assert torch.equal(inputs["cu_seqlens"], batch["cu_seqlens"])
    for rank, resumed in enumerate(loaders()):
        resumed.load_state_dict(state)
        for (x, y), (u, v) in zip(_take(iter(resumed), 5), after[rank], strict=True):
            assert torch.equal(x["input"], u["input"]) and torch.equal(x["cu_seqlens"], u["cu_seqlens"])
            assert torch.equal(y, v)


@pytest.mark.parametrize("change", ["rewritten", "touched", "removed", "added"])
def test_resume_after_a_data_file_changed_is_refused_naming_it(tmp_path, titan_tokenizer, change):
    """The checkpoint's data position carries a fingerprint of every data file; a file rewritten (same size),
    touched, removed or added since is named, where a stale read position would give wrong data."""
    import os

    (tmp_path / "data").mkdir()
    path = _jsonl(tmp_path / "data" / "a.jsonl", _documents(20, "a", seed=8))
    _jsonl(tmp_path / "data" / "b.jsonl", _documents(5, "b", seed=9))
    config = Qwen35DataLoader.Config(sources=[SourceSpec(str(tmp_path / "data"))])

    def loader():
        return Qwen35DataLoader(config, dp_world_size=1, dp_rank=0, tokenizer=titan_tokenizer, seq_len=16,
                                local_batch_size=2)

    first = loader()
    _take(iter(first), 2)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    loader().load_state_dict(state)  # unchanged: accepted
    stat = path.stat()
    if change == "rewritten":
        path.write_text(path.read_text().replace("a1 ", "A1 ", 1))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        message = rf"{path} changed \(first/last bytes\)"
    elif change == "touched":
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        message = rf"{path} changed \(modification time\)"
    elif change == "removed":
        path.unlink()
        message = rf"{path} is gone"
    else:
        _jsonl(tmp_path / "data" / "c.jsonl", ["more"])
        message = rf"{tmp_path / 'data' / 'c.jsonl'} is new"
    with pytest.raises(DataError, match=rf"the data files differ from those the checkpoint's data position was saved "
                                        rf"with: {message}.*--checkpoint.exclude_from_loading dataloader"):
        loader().load_state_dict(state)


def test_dataloader_workers_are_refused(titan_tokenizer, tmp_path):
    config = Qwen35DataLoader.Config(sources=[SourceSpec(str(_jsonl(tmp_path / "a.jsonl", ["x"])))], num_workers=2)
    with pytest.raises(DataError, match=r"dataloader.num_workers = 2: must be 0"):
        Qwen35DataLoader(config, dp_world_size=1, dp_rank=0, tokenizer=titan_tokenizer, seq_len=8, local_batch_size=1)
