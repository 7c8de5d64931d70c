"""Record sources: local JSON lines, parquet, plain text files and `datasets` directories, read lazily in a fixed
order, split across data-parallel ranks and resumable from a cursor.

A source is a path (file, directory or glob) and a format. Its records (dicts) are numbered in reading order
across its files; data-parallel rank r of W reads records r, r + W, r + 2W, ... so ranks never overlap. Reading is
streaming: one JSON line, one parquet row group or one `datasets` slice at a time, so a source may be larger than
memory. `ShardedRecords` walks one rank's share epoch after epoch; its `state_dict` (epoch, record index, file
position) lets a resumed run continue with exactly the next record.

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
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan.tools.logging import logger

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
    """Reads one source's records from a position; yields only the records of one data-parallel rank."""

    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        self.spec, self.fields = spec, fields

    @abstractmethod
    def records(self, position: Any, index: int, rank: int, world: int) -> Iterator[tuple[dict, str, Any, int]]:
        """From `position` (whose record number is `index`): (record, where, position after it, index after it)
        for the records with number % world == rank, to the end of the source."""

    start: Any = 0

    def read(self, rank: int = 0, world: int = 1) -> Iterator[tuple[dict, str]]:
        """(record, where) for this rank's records, from the first."""
        for record, where, *_ in self.records(self.start, 0, rank, world):
            yield record, where

    def first_record(self) -> dict:
        for record, _ in self.read():
            return record
        raise DataError(f"source {self.spec.path}: no records (empty dataset)")

    def _check_fields(self, record: dict, where: str) -> dict:
        for name in self.fields:
            if name not in record:
                raise DataError(f"{where}: missing field {name!r} (fields: {', '.join(map(str, record)) or 'none'})")
        return record


class JsonLinesReader(RecordReader):
    start = (0, 0, 0)  # (file number, byte offset, lines read)

    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        super().__init__(spec, fields)
        self.files = _files(spec, "jsonl")

    def records(self, position, index, rank, world):
        file_number, offset, line_number = position
        for file_number in range(file_number, len(self.files)):
            path = self.files[file_number]
            with path.open("rb") as f:
                f.seek(offset)
                for raw in f:
                    offset += len(raw)
                    line_number += 1
                    if not raw.strip():
                        continue
                    index += 1
                    if (index - 1) % world != rank:
                        continue
                    where = f"{path}:{line_number}"
                    try:
                        record = json.loads(raw)
                    except json.JSONDecodeError as err:  # the position within the line, not json's "line 2"
                        raise DataError(f"{where}: malformed JSON line ({err.msg} at column {err.pos + 1})") from None
                    except UnicodeDecodeError as err:
                        raise DataError(f"{where}: malformed JSON line ({err})") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                    yield self._check_fields(record, where), where, (file_number, offset, line_number), index
            offset, line_number = 0, 0


class ParquetReader(RecordReader):
    start = (0, 0)  # (file number, row)

    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        super().__init__(spec, fields)
        self.files = _files(spec, "parquet")

    def records(self, position, index, rank, world):
        import pyarrow.parquet as pq

        file_number, row = position
        for file_number in range(file_number, len(self.files)):
            path = self.files[file_number]
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            for name in self.fields:
                if name not in names:
                    raise DataError(f"{path}: missing column {name!r} (columns: {', '.join(names)})")
            group_start = 0
            for group in range(parquet.num_row_groups):
                group_rows = parquet.metadata.row_group(group).num_rows
                if group_start + group_rows <= row:
                    group_start += group_rows
                    continue
                rows = parquet.read_row_group(group, columns=list(self.fields) or None).to_pylist()
                for row in range(max(row, group_start), group_start + group_rows):
                    index += 1
                    if (index - 1) % world == rank:
                        yield rows[row - group_start], f"{path} row {row}", (file_number, row + 1), index
                group_start += group_rows
            row = 0


class TextFilesReader(RecordReader):
    start = 0  # file number

    def __init__(self, spec: SourceSpec, fields: tuple[str, ...]):
        super().__init__(spec, fields)
        if set(fields) - {"text"}:
            raise DataError(f"source {spec.path}: plain text files have one field, 'text' (asked for "
                            f"{', '.join(fields)}); set text_field = \"text\"")
        self.files = _files(spec, "text")

    def records(self, position, index, rank, world):
        for file_number in range(position, len(self.files)):
            index += 1
            if (index - 1) % world == rank:
                path = self.files[file_number]
                try:
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}: not UTF-8 text ({err})") from None
                yield {"text": text}, str(path), file_number + 1, index


class HFDatasetReader(RecordReader):
    start = 0  # row
    _SLICE = 1024

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

    def records(self, position, index, rank, world):
        first = position + (rank - position) % world  # the first row of this rank at or after `position`
        for start in range(first, len(self.dataset), self._SLICE * world):
            rows = self.dataset[start:start + self._SLICE * world:world]
            for i, record in enumerate(dict(zip(rows, values)) for values in zip(*rows.values())):
                row = start + i * world
                yield record, f"{self.spec.path} row {row}", row + 1, row + 1


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


class ShardedRecords:
    """One data-parallel rank's records of one source, epoch after epoch, resumable."""

    def __init__(self, reader: RecordReader, dp_rank: int, dp_world_size: int):
        self.reader, self.rank, self.world = reader, dp_rank, dp_world_size
        self.epoch, self.index, self.position = 0, 0, reader.start
        self._records: Iterator | None = None
        if next(reader.read(dp_rank, dp_world_size), None) is None:
            raise DataError(f"source {reader.spec.path}: no records for data-parallel rank {dp_rank} of "
                            f"{dp_world_size} (empty dataset, or fewer records than ranks)")

    def __next__(self) -> tuple[dict, str]:
        while True:  # the rest of this epoch; at its end the next epoch (which has records: checked above)
            if self._records is None:
                self._records = self.reader.records(self.position, self.index, self.rank, self.world)
            for record, where, self.position, self.index in self._records:
                return record, where
            self.epoch, self.index, self.position, self._records = self.epoch + 1, 0, self.reader.start, None
            logger.info(f"data: source {self.reader.spec.path} (dp rank {self.rank}): epoch {self.epoch} begins")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self.position = state["epoch"], state["index"], state["position"]
        self._records = None
