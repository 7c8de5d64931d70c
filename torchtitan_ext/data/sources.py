"""Record sources: local JSON lines, parquet, plain text files and `datasets` directories, read in units, split
across data-parallel ranks by unit and resumable at any world size.

A source is a path (file, directory or glob) and a format. It is cut into units, each read whole: a parquet row
group, the lines starting in one 1 MiB block of a JSON-lines file, a text file, 1,024 rows of a `datasets` table.
A source may be larger than memory; a unit may not. `SourceStream` deals a source's units, epoch after epoch and
optionally shuffled, round robin to the data-parallel ranks, so a rank reads and decodes only its own units (every
rank reads the parquet footers and file sizes to number the units). Its read position is global
(`position.GlobalPosition`): the states of W ranks merge into one, from which W' ranks continue.

Formats (`format = "auto"` picks by name: *.jsonl / *.json, *.parquet, *.txt, or a directory that
`datasets.save_to_disk` wrote or that `datasets.load_dataset` can read):
- jsonl: one JSON object per line (blank lines are not records); a malformed line or a missing field is an
  error naming the file and line.
- parquet: one record per row; the needed columns must exist.
- text: one record `{"text": <file contents>}` per file.
- hf_dataset: a `datasets` directory (`load_from_disk`) or local data files `load_dataset` reads, one split.
"""

from __future__ import annotations

import glob
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchtitan.tools.logging import logger

from .position import GlobalPosition, RankCursor

FORMATS = ("jsonl", "parquet", "text", "hf_dataset")
_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "text": (".txt",)}
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataError(ValueError):
    """Bad data or data configuration; the message names the file (and line or field)."""


@dataclass(frozen=True)
class SourceSpec:
    path: str
    format: str = "auto"
    weight: float = 1.0  # share of the tokens of a pretraining mixture (normalised over sources)
    text_field: str = "text"  # pretraining: the field holding a document
    split: str = "train"  # hf_dataset: which split

    def exists(self) -> bool:
        """The path is a file or directory, or a glob with matches."""
        return Path(self.path).exists() or bool(glob.glob(self.path, recursive=True))

    def resolved_format(self) -> str:
        if self.format != "auto":
            if self.format not in FORMATS:
                raise DataError(f"source {self.path}: unknown format {self.format!r}; known: auto, {', '.join(FORMATS)}")
            return self.format
        path = Path(self.path)
        if path.is_dir():
            if any((path / marker).is_file() for marker in _HF_MARKERS):
                return "hf_dataset"
            suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
            kinds = [fmt for fmt, fmt_suffixes in _SUFFIXES.items() if suffixes.intersection(fmt_suffixes)]
            if len(kinds) == 1:  # a directory of files of one kind
                return kinds[0]
            if kinds:
                raise DataError(f"source {self.path}: the directory holds files of several formats "
                                f"({', '.join(kinds)}); set format (its files of that kind are read) or use a glob")
            raise DataError(f"source {self.path}: a directory with no .jsonl, .parquet, .txt or datasets files")
        for fmt, suffixes in _SUFFIXES.items():
            if self.path.endswith(suffixes):
                return fmt
        raise DataError(f"source {self.path}: cannot tell the format from the name; set format to one of "
                        f"{', '.join(FORMATS)}")


def _files(spec: SourceSpec, fmt: str) -> list[Path]:
    """The source's files in reading order: the file itself, a directory's matching files (recursive, sorted) or
    a glob's matches (sorted)."""
    path = Path(spec.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES[fmt])
    else:
        files = sorted(Path(p) for p in glob.glob(spec.path, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"source {spec.path}: no {fmt} files found")
    return files


class RecordReader(ABC):
    """Reads one source in units: the pieces a rank reads whole (a parquet row group, a block of a JSON-lines file, a
    text file, a slice of a `datasets` table), so ranks that take different units never read the same bytes."""

    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        self.spec, self.fields = spec, fields

    @abstractmethod
    def units(self) -> list[Any]:
        """The source's units in reading order."""

    @abstractmethod
    def unit_records(self, unit: Any) -> Iterator[tuple[dict, Any]]:
        """(record, where) for each record of `unit`, in order; `where` formats as the file and line or row."""

    def read_unit(self, unit: Any) -> list[tuple[dict, Any]]:
        return list(self.unit_records(unit))

    def read(self) -> Iterator[tuple[dict, Any]]:
        """(record, where) for every record, in order; lazily (a bad record is met when reached)."""
        for unit in self.units():
            yield from self.unit_records(unit)

    def has_records(self, units: list[Any]) -> bool:
        return next(self.read(), None) is not None

    def first_record(self) -> dict:
        for record, _ in self.read():
            return record
        raise DataError(f"source {self.spec.path}: no records (empty dataset)")

    def _check_fields(self, record: dict, where: Any) -> dict:
        for name in self.fields:
            if name not in record:
                raise DataError(f"{where}: missing field {name!r} (fields: {', '.join(map(str, record)) or 'none'})")
        return record


class JsonLine:
    """Where a JSON line is, formatted `path:line`. A block read from the middle of a file does not know its line
    numbers; they are counted only when a message needs one."""

    __slots__ = ("path", "offset")

    def __init__(self, path: Path, offset: int):
        self.path, self.offset = path, offset

    def __str__(self) -> str:
        newlines, left = 0, self.offset
        with self.path.open("rb") as f:
            while left:
                chunk = f.read(min(left, 1 << 24))
                newlines, left = newlines + chunk.count(b"\n"), left - len(chunk)
        return f"{self.path}:{newlines + 1}"


class JsonLinesReader(RecordReader):
    BLOCK_BYTES = 1 << 20  # a unit: the lines that start in one block of this many bytes of a file

    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        super().__init__(spec, fields)
        self.files = _files(spec, "jsonl")

    def units(self):
        sizes = [path.stat().st_size for path in self.files]
        return [(n, start, min(start + self.BLOCK_BYTES, size))
                for n, size in enumerate(sizes) for start in range(0, size, self.BLOCK_BYTES)]

    def unit_records(self, unit):
        file_number, start, end = unit
        path = self.files[file_number]
        with path.open("rb") as f:
            if start:
                f.seek(start - 1)
                f.readline()  # the line holding byte start - 1 began in the previous block
            offset = f.tell()
            while offset < end:
                raw = f.readline()
                if not raw:
                    break
                line_start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                where = JsonLine(path, line_start)
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as err:  # the position within the line, not json's "line 2"
                    raise DataError(f"{where}: malformed JSON line ({err.msg} at column {err.pos + 1})") from None
                except UnicodeDecodeError as err:
                    raise DataError(f"{where}: malformed JSON line ({err})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield self._check_fields(record, where), where


class ParquetReader(RecordReader):
    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        super().__init__(spec, fields)
        self.files = _files(spec, "parquet")
        self._open: tuple[int, Any] | None = None  # the last file read: (file number, ParquetFile)

    def _parquet(self, file_number: int):
        """The file opened (its footer read) and its columns checked; a file that is no parquet is a DataError."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._open is None or self._open[0] != file_number:
            path = self.files[file_number]
            try:
                parquet = pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{path}: not a readable parquet file ({err})") from None
            names = parquet.schema_arrow.names
            for name in self.fields:
                if name not in names:
                    raise DataError(f"{path}: missing column {name!r} (columns: {', '.join(names)})")
            self._open = (file_number, parquet)
        return self._open[1]

    def units(self):
        units = []  # (file number, row group, its first row, its rows)
        for file_number in range(len(self.files)):
            metadata = self._parquet(file_number).metadata
            first_row = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                units.append((file_number, group, first_row, rows))
                first_row += rows
        return units

    def unit_records(self, unit):
        import pyarrow as pa

        file_number, group, first_row, _ = unit
        path = self.files[file_number]
        try:
            rows = self._parquet(file_number).read_row_group(group, columns=list(self.fields) or None).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: row group {group} (rows from {first_row}) cannot be read ({err})") from None
        return ((record, f"{path} row {first_row + i}") for i, record in enumerate(rows))

    def has_records(self, units):
        return any(rows for *_, rows in units)


class TextFilesReader(RecordReader):
    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        super().__init__(spec, fields)
        if set(fields) - {"text"}:
            raise DataError(f"source {spec.path}: plain text files have one field, 'text' (asked for "
                            f"{', '.join(fields)}); set text_field = \"text\"")
        self.files = _files(spec, "text")

    def units(self):
        return list(range(len(self.files)))

    def unit_records(self, unit):
        path = self.files[unit]
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err})") from None
        return iter([({"text": text}, str(path))])

    def has_records(self, units):
        return bool(units)


class HFDatasetReader(RecordReader):
    _SLICE = 1024  # rows of a unit

    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        super().__init__(spec, fields)
        import datasets

        path = Path(spec.path)
        try:
            if any((path / marker).is_file() for marker in _HF_MARKERS):
                dataset = datasets.load_from_disk(str(path))
            else:
                dataset = datasets.load_dataset(str(path), split=spec.split)
        except Exception as err:  # datasets raises many types (IndexError, StopIteration, ...) for bad directories
            raise DataError(f"source {spec.path}: cannot load it as a datasets directory "
                            f"({type(err).__name__}: {err})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if spec.split not in dataset:
                raise DataError(f"source {spec.path}: no split {spec.split!r} (splits: {', '.join(dataset)})")
            dataset = dataset[spec.split]
        for name in fields:
            if name not in dataset.column_names:
                raise DataError(f"source {spec.path}: missing column {name!r} (columns: "
                                f"{', '.join(dataset.column_names)})")
        self.dataset = dataset.select_columns(list(fields)) if fields else dataset

    def units(self):
        return [(start, min(start + self._SLICE, len(self.dataset))) for start in range(0, len(self.dataset), self._SLICE)]

    def unit_records(self, unit):
        start, stop = unit
        rows = self.dataset[start:stop]
        return ((dict(zip(rows, values)), f"{self.spec.path} row {start + i}")
                for i, values in enumerate(zip(*rows.values())))

    def has_records(self, units):
        return bool(units)


def string_field(record: dict, field: str, where: str) -> str:
    """record[field], which must be a string (DataError naming `where` and the field otherwise)."""
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


_READERS = {"jsonl": JsonLinesReader, "parquet": ParquetReader, "text": TextFilesReader,
            "hf_dataset": HFDatasetReader}


def open_reader(spec: SourceSpec, fields: tuple[str, ...] = ()) -> RecordReader:
    """A reader of `spec` that checks every record has `fields`."""
    if not spec.exists():
        raise DataError(f"source {spec.path}: no such file or directory")
    return _READERS[spec.resolved_format()](spec, fields)


class SourceStream:
    """Rank r of W's records of one source: its share of the source's units, epoch after epoch, resumable at any
    world size (`position.GlobalPosition`).

    Item j of the global sequence is unit order_e[j % n] of epoch e = j // n, n units a source. With a shuffle
    seed, order_e is a permutation seeded with (seed, e) and a unit's records come in an order seeded with (seed,
    j); without one, units and records come in reading order. A rank reads only the units it takes.
    """

    def __init__(self, reader: RecordReader, dp_rank: int, dp_world_size: int, shuffle_seed: int | None = None):
        self.reader, self.seed = reader, shuffle_seed
        self.units = reader.units()
        if not reader.has_records(self.units):
            raise DataError(f"source {reader.spec.path}: no records (empty dataset)")
        self.cursor = RankCursor(dp_rank, dp_world_size)
        self.epoch = 0
        self._records: list | None = None
        self._order: tuple[int, list[int]] | None = None  # (epoch, its unit order)

    def _unit(self, item: int) -> Any:
        epoch, j = divmod(item, len(self.units))
        if self.seed is None:
            return self.units[j]
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, _permutation(len(self.units), self.seed * 1_000_003 + epoch))
        return self.units[self._order[1][j]]

    def __next__(self) -> tuple[dict, Any]:
        while True:
            if self._records is None:
                item = self.cursor.item()
                if item // len(self.units) > self.epoch:
                    self.epoch = item // len(self.units)
                    logger.info(f"data: source {self.reader.spec.path} (dp rank {self.cursor.rank}): epoch "
                                f"{self.epoch} begins")
                records = self.reader.read_unit(self._unit(item))
                if self.seed is not None:
                    records = [records[i] for i in _permutation(len(records), self.seed * 1_000_003 + item)]
                self._records = records
            if self.cursor.consumed < len(self._records):
                self.cursor.consumed += 1
                return self._records[self.cursor.consumed - 1]
            self.cursor.next_item()
            self._records = None

    def load(self, position: GlobalPosition, progress: list[tuple[int, int]]) -> None:
        """Continue after all ranks' `progress` from `position` (`RankCursor.load`)."""
        self.cursor.load(position, progress)
        self._records = None


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


FINGERPRINT_BYTES = 4096


def fingerprint(path: Path) -> tuple[int, int, str]:
    """(size, mtime in ns, sha256 of the first and last 4 KiB) of a data file: what a resumed run checks its data
    against, cheaply, before trusting a saved read position."""
    stat = path.stat()
    with path.open("rb") as f:
        head = f.read(FINGERPRINT_BYTES)
        f.seek(max(stat.st_size - FINGERPRINT_BYTES, 0))
        tail = f.read()
    return stat.st_size, stat.st_mtime_ns, hashlib.sha256(head + tail).hexdigest()


def source_fingerprints(specs: list[SourceSpec]) -> dict[str, tuple[int, int, str]]:
    """The fingerprint of every file of the sources (a `datasets` directory: every file under it)."""
    fingerprints = {}
    for spec in specs:
        fmt = spec.resolved_format()
        files = sorted(p for p in Path(spec.path).rglob("*") if p.is_file()) if fmt == "hf_dataset" else \
            _files(spec, fmt)
        fingerprints.update((str(path), fingerprint(path)) for path in files)
    return fingerprints


def check_fingerprints(saved: dict[str, tuple[int, int, str]], current: dict[str, tuple[int, int, str]]) -> None:
    """A DataError naming each data file that changed, appeared or disappeared since `saved` was taken."""
    problems = []
    for path in sorted(saved.keys() | current.keys()):
        if path not in current:
            problems.append(f"{path} is gone")
        elif path not in saved:
            problems.append(f"{path} is new")
        elif saved[path] != current[path]:
            (size, mtime, digest), (new_size, new_mtime, new_digest) = saved[path], current[path]
            what = [name for name, old, new in (("size", size, new_size), ("modification time", mtime, new_mtime),
                                                 ("first/last bytes", digest, new_digest)) if old != new]
            problems.append(f"{path} changed ({', '.join(what)})")
    if problems:
        raise DataError("the data files differ from those the checkpoint's data position was saved with: "
                        + "; ".join(problems) + ". Resuming would read from a wrong position: restore the files, "
                        "or start the data from the beginning with --checkpoint.exclude_from_loading dataloader")
