"""Record sources: every format returns exactly the records written, in order; auto format detection; the
data-parallel split (record i -> rank i % W) covers every record once; resuming from a state_dict continues with
exactly the next record across file, row-group and epoch boundaries; errors name the file and line / field."""

import json
import pickle
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
from torchtitan_ext.data.sources import DataError, HFDatasetReader, ShardedRecords, SourceSpec, open_reader

FORMATS = ("jsonl", "parquet", "text", "hf_dataset")


def _records(n, start=0):
    """Distinct records with a non-ASCII character, a newline and a second field."""
    return [{"text": f"doc {i} é\nline two of {i}", "n": i} for i in range(start, start + n)]


def _write_jsonl(path, records, blank_lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if blank_lines:
            lines.append("\n   \n")  # blank lines are not records
    path.write_text("".join(lines), encoding="utf-8")


def _write_parquet(path, records, row_group_size):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records, schema=pa.schema([("text", pa.string()), ("n", pa.int64())]))
    pq.write_table(table, path, row_group_size=row_group_size)
    return pq.ParquetFile(path).num_row_groups


def _write_texts(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(records):
        (directory / f"{i:03d}.txt").write_text(record["text"], encoding="utf-8")


def _save_dataset(path, records):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))


def _source(tmp_path, fmt, records):
    """A source of `records` (each of the multi-file formats split over three files) -> its SourceSpec."""
    if fmt == "jsonl":
        thirds = [records[:4], records[4:5], records[5:]]
        for i, part in enumerate(thirds):
            _write_jsonl(tmp_path / "jsonl" / f"part{i}.jsonl", part, blank_lines=i == 0)
        return SourceSpec(str(tmp_path / "jsonl"))
    if fmt == "parquet":
        _write_parquet(tmp_path / "parquet" / "a.parquet", records[:7], row_group_size=3)  # groups 3, 3, 1
        _write_parquet(tmp_path / "parquet" / "b.parquet", records[7:], row_group_size=2)
        return SourceSpec(str(tmp_path / "parquet"))
    if fmt == "text":
        _write_texts(tmp_path / "text", [{"text": r["text"]} for r in records])
        return SourceSpec(str(tmp_path / "text"))
    _save_dataset(tmp_path / "hf", records)
    return SourceSpec(str(tmp_path / "hf"))


def _expected(fmt, records):
    return [{"text": r["text"]} for r in records] if fmt == "text" else records


def _one_epoch(spec, fields=(), rank=0, world=1):
    reader = open_reader(spec, fields)
    return [record for record, *_ in reader.records(reader.start, 0, rank, world)]


def _re(path):
    return re.escape(str(path))


def _take(sharded, n):
    return [next(sharded)[0] for _ in range(n)]


@pytest.fixture(autouse=True)
def _hf_offline_cache(tmp_path, monkeypatch):
    """`datasets` works offline and caches under tmp_path (its config is read at import, so patch both)."""
    import datasets

    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    return cache


# ---------------------------------------------------------------------------------------------------- formats


def test_jsonl_file_returns_records_in_order_skipping_blank_lines(tmp_path):
    records = _records(5)
    _write_jsonl(tmp_path / "a.jsonl", records, blank_lines=True)
    assert _one_epoch(SourceSpec(str(tmp_path / "a.jsonl"))) == records
    # the fields asked for are checked, not projected: the whole record comes back
    assert _one_epoch(SourceSpec(str(tmp_path / "a.jsonl")), fields=("text",)) == records


def test_jsonl_directory_reads_files_sorted_recursively_and_ignores_other_files(tmp_path):
    records = _records(9)
    _write_jsonl(tmp_path / "d" / "01.jsonl", records[3:6])
    _write_jsonl(tmp_path / "d" / "00.jsonl", records[:3])
    _write_jsonl(tmp_path / "d" / "sub" / "02.jsonl", records[6:])
    (tmp_path / "d" / "01.jsonl").write_text((tmp_path / "d" / "01.jsonl").read_text().rstrip("\n"))  # no final newline
    (tmp_path / "d" / "README.md").write_text("not data\n")
    assert _one_epoch(SourceSpec(str(tmp_path / "d"))) == records


def test_jsonl_glob_reads_matches_sorted(tmp_path):
    records = _records(6)
    _write_jsonl(tmp_path / "d" / "b.jsonl", records[2:4])
    _write_jsonl(tmp_path / "d" / "a.jsonl", records[:2])
    _write_jsonl(tmp_path / "d" / "c.jsonl", records[4:])
    _write_jsonl(tmp_path / "d" / "skip.json", _records(2, start=100))  # not matched by the glob
    assert _one_epoch(SourceSpec(str(tmp_path / "d" / "*.jsonl"))) == records
    assert _one_epoch(SourceSpec(str(tmp_path / "d" / "[ab].jsonl"))) == records[:4]


def test_parquet_row_groups_and_files_in_order(tmp_path):
    records = _records(13)
    assert _write_parquet(tmp_path / "p" / "a.parquet", records[:8], row_group_size=3) == 3  # 3, 3, 2
    assert _write_parquet(tmp_path / "p" / "b.parquet", records[8:], row_group_size=2) == 3  # 2, 2, 1
    assert _one_epoch(SourceSpec(str(tmp_path / "p"))) == records
    assert _one_epoch(SourceSpec(str(tmp_path / "p" / "a.parquet"))) == records[:8]
    # with fields, only those columns are read
    assert _one_epoch(SourceSpec(str(tmp_path / "p")), fields=("text",)) == [{"text": r["text"]} for r in records]


def test_text_files_one_record_per_file(tmp_path):
    texts = ["first file\nwith two lines\n", "", "ünïcödé — 字", "last"]
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "a.txt").write_text(texts[0], encoding="utf-8")
    (tmp_path / "t" / "b.txt").write_text(texts[1], encoding="utf-8")
    (tmp_path / "t" / "c.txt").write_text(texts[2], encoding="utf-8")
    (tmp_path / "t" / "sub" / "d.txt").write_text(texts[3], encoding="utf-8")
    (tmp_path / "t" / "notes.md").write_text("ignored")
    assert _one_epoch(SourceSpec(str(tmp_path / "t"))) == [{"text": t} for t in texts]
    assert _one_epoch(SourceSpec(str(tmp_path / "t" / "c.txt"))) == [{"text": texts[2]}]


def test_hf_dataset_saved_to_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(HFDatasetReader, "_SLICE", 4)  # several slices
    records = _records(11)
    _save_dataset(tmp_path / "hf", records)
    assert _one_epoch(SourceSpec(str(tmp_path / "hf"))) == records
    assert _one_epoch(SourceSpec(str(tmp_path / "hf")), fields=("text",)) == [{"text": r["text"]} for r in records]


def test_hf_dataset_dict_reads_the_configured_split(tmp_path):
    import datasets

    train, validation = _records(5), _records(3, start=50)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "validation": datasets.Dataset.from_list(validation)}).save_to_disk(str(tmp_path / "dd"))
    assert _one_epoch(SourceSpec(str(tmp_path / "dd"))) == train
    assert _one_epoch(SourceSpec(str(tmp_path / "dd"), split="validation")) == validation
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, validation\)"):
        open_reader(SourceSpec(str(tmp_path / "dd"), split="test"))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_hf_dataset_format_loads_a_directory_of_data_files_offline(tmp_path, kind, _hf_offline_cache):
    records = _records(7)
    if kind == "jsonl":
        _write_jsonl(tmp_path / "files" / "a.jsonl", records[:4])
        _write_jsonl(tmp_path / "files" / "b.jsonl", records[4:])
    else:
        _write_parquet(tmp_path / "files" / "a.parquet", records[:4], row_group_size=2)
        _write_parquet(tmp_path / "files" / "b.parquet", records[4:], row_group_size=2)
    spec = SourceSpec(str(tmp_path / "files"), format="hf_dataset")
    assert sorted(_one_epoch(spec), key=lambda r: r["n"]) == records
    assert _one_epoch(spec) == records  # data files in sorted order
    assert any(_hf_offline_cache.rglob("*.arrow"))  # the cache went to tmp_path
    assert SourceSpec(str(tmp_path / "files")).resolved_format() == kind  # auto reads them directly
    with pytest.raises(DataError, match="cannot load it as a datasets directory"):
        open_reader(SourceSpec(str(tmp_path / "files"), format="hf_dataset", split="validation"))


# ----------------------------------------------------------------------------------------- format detection


def test_auto_format_by_name(tmp_path):
    for name in ("a.jsonl", "a.json", "a.parquet", "a.txt", "a.csv", "noext"):
        (tmp_path / name).write_text("x")
    assert SourceSpec(str(tmp_path / "a.jsonl")).resolved_format() == "jsonl"
    assert SourceSpec(str(tmp_path / "a.json")).resolved_format() == "jsonl"
    assert SourceSpec(str(tmp_path / "a.parquet")).resolved_format() == "parquet"
    assert SourceSpec(str(tmp_path / "a.txt")).resolved_format() == "text"
    assert SourceSpec(str(tmp_path / "*.parquet")).resolved_format() == "parquet"
    assert SourceSpec(str(tmp_path / "a.csv"), format="text").resolved_format() == "text"  # explicit wins
    for fmt in FORMATS:
        assert _source(tmp_path / fmt, fmt, _records(8)).resolved_format() == fmt  # directories
    with pytest.raises(DataError, match=r"a\.csv: cannot tell the format from the name; set format to one of "
                                        r"jsonl, parquet, text, hf_dataset"):
        SourceSpec(str(tmp_path / "a.csv")).resolved_format()
    with pytest.raises(DataError, match="noext: cannot tell the format"):
        open_reader(SourceSpec(str(tmp_path / "noext")))
    with pytest.raises(DataError, match=r"a\.jsonl: unknown format 'csv'; known: auto, jsonl"):
        SourceSpec(str(tmp_path / "a.jsonl"), format="csv").resolved_format()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"other: a directory with no \.jsonl, \.parquet, \.txt or datasets files"):
        open_reader(SourceSpec(str(tmp_path / "other")))
    _write_parquet(tmp_path / "mixed" / "part-0.parquet", _records(4), row_group_size=2)
    (tmp_path / "mixed" / "dataset_infos.json").write_text("{}")  # e.g. metadata of a hub clone
    with pytest.raises(DataError, match=r"mixed: the directory holds files of several formats \(jsonl, parquet\); "
                                        r"set format"):
        SourceSpec(str(tmp_path / "mixed")).resolved_format()
    assert [r for r, *_ in open_reader(SourceSpec(str(tmp_path / "mixed"), format="parquet")).records(
        (0, 0), 0, 0, 1)] == _records(4)


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("fmt", FORMATS)
def test_three_ranks_split_every_record_exactly_once(tmp_path, fmt, monkeypatch):
    monkeypatch.setattr(HFDatasetReader, "_SLICE", 2)  # slices of 2 * world rows
    records = _records(11)
    spec = _source(tmp_path, fmt, records)
    expected = _expected(fmt, records)
    shares = []
    for rank in range(3):
        sharded = ShardedRecords(open_reader(spec), rank, 3)
        share = []
        while sharded.epoch == 0:
            record, where = next(sharded)
            share.append(record)
        share.pop()  # the first record of epoch 1
        assert share == expected[rank::3]  # record i -> rank i % 3, in order
        shares.append(share)
    assert sorted(map(json.dumps, sum(shares, []))) == sorted(map(json.dumps, expected))  # union, no overlap
    assert [len(s) for s in shares] == [4, 4, 3]


# -------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 3)])
def test_resume_continues_with_exactly_the_next_record(tmp_path, fmt, rank, world, monkeypatch):
    """Every stopping point k over two and a half epochs: file, row-group and epoch boundaries included."""
    monkeypatch.setattr(HFDatasetReader, "_SLICE", 2)
    records = _records(11)
    spec = _source(tmp_path, fmt, records)
    expected = _expected(fmt, records)[rank::world]
    n = len(expected)
    uninterrupted = ShardedRecords(open_reader(spec), rank, world)
    stream = _take(uninterrupted, 4 * n)
    assert stream == expected * 4
    following = n + 2
    for k in range(2 * n + 1):
        first = ShardedRecords(open_reader(spec), rank, world)
        assert _take(first, k) == stream[:k]
        state = pickle.loads(pickle.dumps(first.state_dict()))  # torchtitan pickles the dataloader state
        assert state["epoch"] == max(k - 1, 0) // n  # the epoch of the last record read
        resumed = ShardedRecords(open_reader(spec), rank, world)
        resumed.load_state_dict(state)
        assert _take(resumed, following) == stream[k:k + following], f"resumed after {k} records"
        assert resumed.epoch == (k + following - 1) // n


def test_resume_keeps_jsonl_line_numbers(tmp_path):
    """After resuming mid-file, an error still names the right line."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n\n{"text": \n')
    first = ShardedRecords(open_reader(SourceSpec(str(path))), 0, 1)
    assert _take(first, 2) == [{"text": "a"}, {"text": "b"}]
    resumed = ShardedRecords(open_reader(SourceSpec(str(path))), 0, 1)
    resumed.load_state_dict(first.state_dict())
    assert next(resumed)[0] == {"text": "c"}
    with pytest.raises(DataError, match=rf"{_re(path)}:6: malformed JSON line"):
        next(resumed)


# -------------------------------------------------------------------------------------------------- epochs


@pytest.mark.parametrize("fmt", FORMATS)
def test_reading_past_the_end_starts_the_next_epoch(tmp_path, fmt):
    records = _records(8)
    expected = _expected(fmt, records)
    sharded = ShardedRecords(open_reader(_source(tmp_path, fmt, records)), 0, 1)
    epochs, seen = [], []
    for _ in range(2 * len(records) + 3):
        record, where = next(sharded)
        seen.append(record)
        epochs.append(sharded.epoch)
    assert seen == (expected * 3)[:len(seen)]
    assert epochs == [0] * 8 + [1] * 8 + [2] * 3
    assert sharded.state_dict()["index"] == 3


def test_where_names_file_and_line_or_row(tmp_path):
    records = _records(4)
    _write_jsonl(tmp_path / "a.jsonl", records, blank_lines=True)
    sharded = ShardedRecords(open_reader(SourceSpec(str(tmp_path / "a.jsonl"))), 0, 1)
    assert [next(sharded)[1] for _ in range(4)] == [f"{tmp_path / 'a.jsonl'}:{line}" for line in (1, 4, 7, 10)]
    _write_parquet(tmp_path / "p.parquet", records, row_group_size=3)
    sharded = ShardedRecords(open_reader(SourceSpec(str(tmp_path / "p.parquet"))), 1, 2)
    assert [next(sharded)[1] for _ in range(2)] == [f"{tmp_path / 'p.parquet'} row {row}" for row in (1, 3)]


# -------------------------------------------------------------------------------------------------- errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "after"}\n')
    sharded = ShardedRecords(open_reader(SourceSpec(str(path)), ("text",)), 0, 1)
    assert next(sharded)[0] == {"text": "ok"}
    with pytest.raises(DataError, match=rf"^{_re(path)}:3: malformed JSON line"):
        next(sharded)


def test_non_object_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n["text"]\n')
    with pytest.raises(DataError, match=rf"^{_re(path)}:2: expected a JSON object, got list"):
        _one_epoch(SourceSpec(str(path)))


def test_missing_field_names_field_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text", "id": 3}\n')
    sharded = ShardedRecords(open_reader(SourceSpec(str(path)), ("text",)), 0, 1)
    next(sharded)
    with pytest.raises(DataError, match=rf"^{_re(path)}:2: missing field 'text' \(fields: content, id\)"):
        next(sharded)


def test_parquet_missing_column_names_column_and_file(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    with pytest.raises(DataError, match=rf"^{_re(path)}: missing column 'text' \(columns: content\)"):
        ShardedRecords(open_reader(SourceSpec(str(path)), ("text",)), 0, 1)


def test_hf_dataset_missing_column_names_column_and_source(tmp_path):
    _save_dataset(tmp_path / "hf", [{"content": "a"}])
    with pytest.raises(DataError, match=rf"source {_re(tmp_path / 'hf')}: missing column 'text' \(columns: content\)"):
        open_reader(SourceSpec(str(tmp_path / "hf")), ("text",))


def test_text_files_only_have_a_text_field(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"plain text files have one field, 'text' \(asked for body\)"):
        open_reader(SourceSpec(str(tmp_path / "a.txt"), text_field="body"), ("body",))


def test_empty_files_fail_at_construction(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    for name in ("empty.jsonl", "blank.jsonl", "empty.parquet"):
        reader = open_reader(SourceSpec(str(tmp_path / name)), ("text",))
        with pytest.raises(DataError, match=rf"source {_re(tmp_path / name)}: no records for data-parallel rank 0 "
                                            r"of 1 \(empty dataset"):
            ShardedRecords(reader, 0, 1)


@pytest.mark.parametrize("case", ["saved_empty_dataset", "empty_data_file"])
def test_empty_hf_dataset_fails_at_construction_with_a_data_error(tmp_path, case):
    """An empty saved Dataset, and an empty data file read with format = "hf_dataset". `datasets` itself raises
    IndexError (load_from_disk of a 0-shard dataset) and StopIteration (the json builder inferring the schema)
    here; the reader must turn them into a DataError naming the source."""
    import datasets

    if case == "saved_empty_dataset":
        datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty"))
        spec = SourceSpec(str(tmp_path / "empty"))
    else:
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "a.jsonl").write_text("")
        spec = SourceSpec(str(tmp_path / "empty"), format="hf_dataset")
    with pytest.raises(DataError, match=rf"source {_re(spec.path)}: "):
        ShardedRecords(open_reader(spec, ("text",)), 0, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fewer_records_than_ranks(tmp_path, fmt):
    spec = _source(tmp_path, fmt, _records(2))
    assert [next(ShardedRecords(open_reader(spec), rank, 3))[0]["text"] for rank in (0, 1)] == \
        [r["text"] for r in _records(2)]
    with pytest.raises(DataError, match=r"no records for data-parallel rank 2 of 3 \(empty dataset, or fewer "
                                        r"records than ranks\)"):
        ShardedRecords(open_reader(spec), 2, 3)


def test_missing_paths(tmp_path):
    for path in (tmp_path / "nope.jsonl", tmp_path / "nope", tmp_path / "*.parquet"):
        with pytest.raises(DataError, match=rf"source {_re(path)}: no such file or directory"):
            open_reader(SourceSpec(str(path)))
    with pytest.raises(DataError, match="no such file or directory"):
        open_reader(SourceSpec(str(tmp_path / "nope"), format="hf_dataset"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="cannot load it as a datasets directory"):
        open_reader(SourceSpec(str(tmp_path / "empty_dir"), format="hf_dataset"))
    with pytest.raises(DataError, match="no jsonl files found"):
        open_reader(SourceSpec(str(tmp_path / "empty_dir"), format="jsonl"))
