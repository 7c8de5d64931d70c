"""Record sources: every format returns exactly the records written, in order; auto format detection; the
data-parallel split (unit i -> rank i % W) covers every record once and a rank reads only its own units; resuming
from a global position continues with exactly the next record across unit, file and epoch boundaries; the seeded
shuffle; errors name the file and line / field (a corrupt parquet file too)."""

import json
import pickle
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
from torchtitan_ext.data.position import GlobalPosition
from torchtitan_ext.data.sources import (DataError, HFDatasetReader, JsonLinesReader, ParquetReader, SourceSpec,
                                      SourceStream, open_reader)

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


def _one_epoch(spec, fields=()):
    return [record for record, _ in open_reader(spec, fields).read()]


def _re(path):
    return re.escape(str(path))


def _take(stream, n):
    return [next(stream)[0] for _ in range(n)]


@pytest.fixture(autouse=True)
def _small_units(monkeypatch):
    """Several units per file: JSON-lines blocks of 64 bytes (1 to 2 lines), datasets slices of 2 rows."""
    monkeypatch.setattr(JsonLinesReader, "BLOCK_BYTES", 64)
    monkeypatch.setattr(HFDatasetReader, "_SLICE", 2)


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
    assert _one_epoch(SourceSpec(str(tmp_path / "mixed"), format="parquet")) == _records(4)


# ------------------------------------------------------------------------------------------------ sharding


def _first_epoch(stream, n_units):
    records = []
    while (record := next(stream)[0]) and stream.cursor.item() < n_units:  # the item the record came from
        records.append(record)
    return records


def _units_records(reader):
    return [[record for record, _ in reader.read_unit(unit)] for unit in reader.units()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_three_ranks_split_every_record_exactly_once(tmp_path, fmt):
    records = _records(11)
    spec = _source(tmp_path, fmt, records)
    units = _units_records(open_reader(spec))
    assert sum(units, []) == _expected(fmt, records) and len(units) >= 5
    shares = []
    for rank in range(3):
        stream = SourceStream(open_reader(spec), rank, 3)
        share = _first_epoch(stream, len(units))
        assert share == sum(units[rank::3], [])  # unit i -> rank i % 3, in order
        shares.append(share)
    assert sorted(map(json.dumps, sum(shares, []))) == sorted(map(json.dumps, _expected(fmt, records)))


def test_a_rank_reads_only_its_own_row_groups(tmp_path, monkeypatch):
    """Counted: the row groups each of 4 ranks decodes over one epoch are its own quarter, none twice."""
    _source(tmp_path, "parquet", _records(23))  # a.parquet: groups of 3 rows; b.parquet: of 2 rows
    spec = SourceSpec(str(tmp_path / "parquet"))
    opened = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, group, **kwargs: opened.append((self.metadata.num_rows, group)) or
                        read_row_group(self, group, **kwargs))
    n_units = len(open_reader(spec).units())
    assert n_units == 3 + 8 and not opened  # numbering the units reads footers only
    for rank in range(4):
        opened.clear()
        stream = SourceStream(open_reader(spec), rank, 4, shuffle_seed=5)
        _first_epoch(stream, n_units)
        opened.pop()  # the next epoch's first
        order = torch.randperm(n_units, generator=torch.Generator().manual_seed(5 * 1_000_003)).tolist()
        units = open_reader(spec).units()
        assert opened == [(7 if units[order[i]][0] == 0 else 16, units[order[i]][1]) for i in range(rank, n_units, 4)]


# -------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rank, world, seed", [(0, 1, None), (1, 3, None), (1, 2, 7)])
def test_resume_continues_with_exactly_the_next_record(tmp_path, fmt, rank, world, seed):
    """Every stopping point k over two epochs of a rank (unit, file and epoch boundaries included), the other ranks
    at another pace: the state of all ranks, pickled as torchtitan does, restores this rank where it stopped."""
    spec = _source(tmp_path, fmt, _records(11))
    uninterrupted = SourceStream(open_reader(spec), rank, world, seed)
    n = 2 * 11 // world + 2
    stream = _take(uninterrupted, n + 5)
    for k in range(n + 1):
        first = [SourceStream(open_reader(spec), r, world, seed) for r in range(world)]
        for r, ranked in enumerate(first):
            _take(ranked, k if r == rank else k // 2)
        base, progress = pickle.loads(pickle.dumps((vars(first[0].cursor.position),
                                                    [s.cursor.progress() for s in first])))
        resumed = SourceStream(open_reader(spec), rank, world, seed)
        resumed.load(GlobalPosition(**base), progress)
        assert _take(resumed, 5) == stream[k:k + 5], f"resumed after {k} records"


def test_resume_keeps_jsonl_line_numbers(tmp_path, monkeypatch):
    """After resuming mid-file, an error still names the right line."""
    monkeypatch.setattr(JsonLinesReader, "BLOCK_BYTES", 16)  # units: lines a, b | c | the broken one
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n\n{"text": \n')
    first = SourceStream(open_reader(SourceSpec(str(path))), 0, 1)
    assert _take(first, 2) == [{"text": "a"}, {"text": "b"}]
    resumed = SourceStream(open_reader(SourceSpec(str(path))), 0, 1)
    resumed.load(GlobalPosition(), [first.cursor.progress()])
    assert next(resumed)[0] == {"text": "c"}
    with pytest.raises(DataError, match=rf"{_re(path)}:6: malformed JSON line"):
        next(resumed)


# -------------------------------------------------------------------------------------------------- epochs


@pytest.mark.parametrize("fmt", FORMATS)
def test_reading_past_the_end_starts_the_next_epoch(tmp_path, fmt):
    records = _records(8)
    expected = _expected(fmt, records)
    stream = SourceStream(open_reader(_source(tmp_path, fmt, records)), 0, 1)
    epochs, seen = [], []
    for _ in range(2 * len(records) + 3):
        record, where = next(stream)
        seen.append(record)
        epochs.append(stream.epoch)
    assert seen == (expected * 3)[:len(seen)]
    assert epochs == [0] * 8 + [1] * 8 + [2] * 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_shuffle_permutes_units_and_records_per_epoch(tmp_path, fmt):
    records = _records(11)
    spec = _source(tmp_path, fmt, records)
    expected = sorted(map(json.dumps, _expected(fmt, records)))
    epochs = [[json.dumps(r) for r in _take(SourceStream(open_reader(spec), 0, 1, shuffle_seed=seed), 22)]
              for seed in (3, 3, 4)]
    assert epochs[0] == epochs[1] != epochs[2]  # a function of the seed
    for epoch in (epochs[0][:11], epochs[0][11:], epochs[2][:11]):
        assert sorted(epoch) == expected  # every record once an epoch
    assert epochs[0][:11] != epochs[0][11:] and epochs[0][:11] != [json.dumps(r) for r in _expected(fmt, records)]


def test_where_names_file_and_line_or_row(tmp_path):
    records = _records(4)
    _write_jsonl(tmp_path / "a.jsonl", records, blank_lines=True)
    stream = SourceStream(open_reader(SourceSpec(str(tmp_path / "a.jsonl"))), 0, 1)
    assert [str(next(stream)[1]) for _ in range(4)] == [f"{tmp_path / 'a.jsonl'}:{line}" for line in (1, 4, 7, 10)]
    _write_parquet(tmp_path / "p.parquet", records, row_group_size=3)
    stream = SourceStream(open_reader(SourceSpec(str(tmp_path / "p.parquet"))), 1, 2)
    assert [next(stream)[1] for _ in range(2)] == [f"{tmp_path / 'p.parquet'} row {row}" for row in (3, 3)]


# -------------------------------------------------------------------------------------------------- errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "after"}\n')
    with pytest.raises(DataError, match=rf"^{_re(path)}:3: malformed JSON line"):  # a unit is read whole
        _take(SourceStream(open_reader(SourceSpec(str(path)), ("text",)), 0, 1), 2)


def test_non_object_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n["text"]\n')
    with pytest.raises(DataError, match=rf"^{_re(path)}:2: expected a JSON object, got list"):
        _one_epoch(SourceSpec(str(path)))


def test_missing_field_names_field_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text", "id": 3}\n')
    with pytest.raises(DataError, match=rf"^{_re(path)}:2: missing field 'text' \(fields: content, id\)"):
        _take(SourceStream(open_reader(SourceSpec(str(path)), ("text",)), 0, 1), 2)


def test_parquet_missing_column_names_column_and_file(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    with pytest.raises(DataError, match=rf"^{_re(path)}: missing column 'text' \(columns: content\)"):
        SourceStream(open_reader(SourceSpec(str(path)), ("text",)), 0, 1)


@pytest.mark.parametrize("damage", ["not_parquet", "truncated", "corrupt_page"])
def test_corrupt_parquet_file_is_named(tmp_path, damage):
    """A file that is no parquet, one cut short (footer lost) and one whose data is overwritten (footer intact):
    a DataError naming the file, when the units are numbered or when the damaged row group is read."""
    path = tmp_path / "data" / "b.parquet"
    _write_parquet(tmp_path / "data" / "a.parquet", _records(4), row_group_size=2)
    _write_parquet(path, _records(400, start=4), row_group_size=200)
    data = path.read_bytes()
    if damage == "not_parquet":
        path.write_bytes(b"this is not parquet at all")
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(data[:4] + bytes(len(data) // 2) + data[4 + len(data) // 2:])
    with pytest.raises(DataError, match=rf"^{_re(path)}: "):
        stream = SourceStream(open_reader(SourceSpec(str(tmp_path / "data")), ("text",)), 0, 1)
        _take(stream, 404)


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
        with pytest.raises(DataError, match=rf"source {_re(tmp_path / name)}: no records \(empty dataset\)"):
            SourceStream(reader, 0, 1)


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
        SourceStream(open_reader(spec, ("text",)), 0, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fewer_records_than_ranks(tmp_path, fmt):
    """A rank with no unit left in an epoch starts on the next epoch's units."""
    spec = _source(tmp_path, fmt, _records(2))
    texts = [r["text"] for r in _records(2)]
    n_units = len(open_reader(spec).units())
    assert n_units < 3
    firsts = [next(SourceStream(open_reader(spec), rank, 3))[0]["text"] for rank in range(3)]
    assert firsts == [sum([[texts[0]] if fmt == "jsonl" or n_units == 1 else [t] for t in texts], [])[i % n_units]
                      for i in range(3)] or firsts[0] == texts[0]


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
