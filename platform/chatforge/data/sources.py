"""Readers: conversation files -> raw rows -> records in our schema, streaming and split across Ray tasks.

Reading happens in two stages so that bad input never stops a run:
1. A Ray Data ``Datasource`` emits *raw* rows (the text of one record and where it came from). JSONL files are cut
   into byte ranges, one read task each; a JSON array (or the top-level object of the chitchat corpus) is scanned
   by one streaming task per file that never holds more than the current record.
2. ``formats.parse_raw_records`` (a pure per-batch function, mapped in parallel) turns each raw row into a record,
   or into a row with ``drop_reason="malformed:<why>"`` that keeps the raw text.
"""

from __future__ import annotations

import codecs
import functools
import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from chatforge.config import NormalizeSpec, ReadSpec, SourceSpec
from chatforge.data.formats import check_parquet_records, parse_raw_records
from chatforge.data.schema import BASE_SCHEMA, STAGE_SECONDS_COLUMN, STAGE_SECONDS_TYPE, map_records, with_columns
from chatforge.runtime import cluster_cpus

RAW_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("format", pa.string()),
        ("origin", pa.string()),
        ("raw", pa.string()),
        ("error", pa.string()),
    ]
)

RECORD_SCHEMA = with_columns(BASE_SCHEMA, {STAGE_SECONDS_COLUMN: STAGE_SECONDS_TYPE})

EXTENSIONS = {
    "sharegpt": (".json", ".jsonl"),
    "openai": (".jsonl", ".json"),
    "parquet": (".parquet",),
    "chitchat": (".json",),
}


class SourceError(ValueError):
    """A source that cannot be read at all (missing path, no files); the message names it."""


def chitchat_corpus_path() -> str:
    """The conversation corpus shipped inside the `chitchat-dataset` PyPI package (a JSON object of 7k chats)."""
    import chitchat_dataset

    return os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")


def list_files(source: SourceSpec) -> list[str]:
    """The files of a source: a file, every matching file in a directory (recursively), or a glob."""
    if source.format == "chitchat" and source.path is None:
        return [chitchat_corpus_path()]
    assert source.path is not None
    path = os.path.expanduser(source.path)
    if os.path.isdir(path):
        found = [
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if name.endswith(EXTENSIONS[source.format])
        ]
    elif any(ch in path for ch in "*?["):
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(path):
        found = [path]
    else:
        raise SourceError(f"source {source.name!r}: {source.path} does not exist")
    if not found:
        raise SourceError(f"source {source.name!r}: no {'/'.join(EXTENSIONS[source.format])} files under {path}")
    return sorted(found)


# ---------------------------------------------------------------- raw readers (run inside Ray read tasks)


def _first_significant_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip().lstrip(b"\xef\xbb\xbf").lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _raw_row(source: str, fmt: str, origin: str, raw: str, error: str | None = None) -> dict[str, Any]:
    return {"source": source, "format": fmt, "origin": origin, "raw": raw, "error": error}


def _blocks(rows: Iterator[dict[str, Any]], block_rows: int) -> Iterator[pa.Table]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= block_rows:
            yield pa.Table.from_pylist(batch, schema=RAW_SCHEMA)
            batch = []
    if batch:
        yield pa.Table.from_pylist(batch, schema=RAW_SCHEMA)


def iter_jsonl_range(path: str, start: int, end: int, read: ReadSpec) -> Iterator[tuple[int, str, str | None]]:
    """Yield (byte offset, text, error) for each line that *starts* in [start, end).

    A range that begins mid-line skips to the next line: that line belongs to the range it started in.
    """
    limit = read.max_record_bytes
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()
        while (offset := f.tell()) < end:
            line = f.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield offset, line[: read.raw_keep_bytes].decode("utf-8", "replace"), "record_too_large"
                continue
            if not line.strip():
                continue
            try:
                yield offset, line.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError:
                yield offset, line.decode("utf-8", "replace").rstrip("\r\n"), "invalid_utf8"


# A JSON string (escapes included), a bracket, a comma, or a lone quote: a string cut off by the buffer's end.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]|"')


def iter_json_elements(path: str, read: ReadSpec, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, str, str | None]]:
    """Yield (element number, raw text, error) for each element of a top-level JSON array or object, streaming.

    Only the current element is held in memory. For an object, an element is a ``"key": value`` member. An element
    over ``max_record_bytes`` is reported (its head kept) and skipped; a file cut off mid-element yields the
    partial element with error "truncated".
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buf = ""
    scan = 0  # where the token scan resumes in buf
    start = None  # where the current element starts in buf (None before the top-level bracket)
    depth = 0
    number = 0
    oversize_head: str | None = None
    with open(path, "rb") as f:
        eof = False
        while not eof:
            data = f.read(chunk_chars)
            eof = not data
            buf += decoder.decode(data, final=eof)
            for match in _JSON_TOKEN.finditer(buf, scan):
                token = match.group()
                if token == '"' and not eof:
                    break  # an unterminated string: read more first
                scan = match.end()
                if token in "[{":
                    depth += 1
                    if depth == 1:
                        start = scan
                    continue
                if token in "]}":
                    depth -= 1
                    if depth > 0:
                        continue
                elif token != "," or depth != 1:
                    continue
                # An element ends here: a comma at depth 1, or the closing bracket.
                raw = buf[start : match.start()]
                if oversize_head is not None:
                    number += 1
                    yield number, oversize_head, "record_too_large"
                    oversize_head = None
                elif raw.strip():
                    number += 1
                    yield number, raw.strip(), None
                start = scan
                if depth == 0:
                    return
            if start is None:  # still before the top-level bracket
                buf, scan = buf[scan:], 0
                continue
            # Keep only the current element: drop what was consumed before it.
            buf, scan, start = buf[start:], scan - start, 0
            if len(buf) > read.max_record_bytes:
                oversize_head = oversize_head or buf[: read.raw_keep_bytes]
                buf, scan = buf[scan:], 0
    if oversize_head is not None:
        yield number + 1, oversize_head, "record_too_large"
    elif start is not None and buf.strip():
        yield number + 1, buf.strip()[: read.raw_keep_bytes], "truncated"


def _jsonl_task(path: str, start: int, end: int, source: str, fmt: str, read: ReadSpec) -> Iterator[pa.Table]:
    rows = (
        _raw_row(source, fmt, f"{path}@byte={offset}", text, error)
        for offset, text, error in iter_jsonl_range(path, start, end, read)
    )
    yield from _blocks(rows, read.block_rows)


def _json_task(path: str, source: str, fmt: str, read: ReadSpec) -> Iterator[pa.Table]:
    rows = (
        _raw_row(source, fmt, f"{path}#record={number}", text, error)
        for number, text, error in iter_json_elements(path, read)
    )
    yield from _blocks(rows, read.block_rows)


# A JSONL range below this is not worth a task of its own: Ray Data's per-task costs (scheduling, a staged file
# each) then outweigh the work: the curation benchmark's first pass took 1.7x the CPU on 1 MiB blocks that it takes on
# 26 MiB ones.
MIN_RANGE_BYTES = 4 << 20


@dataclass
class ConversationFiles:
    """One source's files as Ray Data read tasks: JSONL byte ranges, or one streaming task per JSON document.

    ``cpus`` is the cluster's CPU count: JSONL ranges are cut to give every CPU about two tasks (see
    `range_bytes`).
    """

    source: SourceSpec
    read: ReadSpec
    cpus: int = 1

    def tasks(self) -> list[tuple[functools.partial, int]]:
        planned = []
        jsonl: list[tuple[str, int]] = []
        for path in list_files(self.source):
            size = os.path.getsize(path)
            if self.source.format == "chitchat" or _first_significant_byte(path) == b"[":
                planned.append(
                    (functools.partial(_json_task, path, self.source.name, self.source.format, self.read), size)
                )
            else:
                jsonl.append((path, size))
        range_bytes = self.range_bytes(sum(size for _, size in jsonl))
        for path, size in jsonl:
            for start in range(0, max(size, 1), range_bytes):
                end = min(start + range_bytes, size)
                fn = functools.partial(_jsonl_task, path, start, end, self.source.name, self.source.format, self.read)
                planned.append((fn, end - start))
        return planned

    def range_bytes(self, total: int) -> int:
        """Equal ranges, as many as it takes to keep each under ``read.range_bytes`` and at least two per CPU when
        every range still holds ``MIN_RANGE_BYTES``: equal, so that no CPU is left with the last long task."""
        ranges = max(-(-total // self.read.range_bytes), min(2 * max(self.cpus, 1), total // MIN_RANGE_BYTES), 1)
        return max(-(-total // ranges), 1)

    def num_blocks(self, num_tasks: int) -> int:
        """Blocks to ask Ray Data for: one per read task, so it fuses the steps after the read into those tasks and
        each task streams its range through them; twice that when there are fewer tasks than CPUs (one big JSON
        document, say), so the read's blocks are split off to parallel tasks instead."""
        return num_tasks if num_tasks >= self.cpus else 2 * max(num_tasks, 1)


def _make_datasource(files: ConversationFiles):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ConversationDatasource(Datasource):
        def __init__(self):
            super().__init__()
            self.planned = files.tasks()

        def get_name(self) -> str:
            return f"Read{files.source.format.capitalize()}"

        def estimate_inmemory_data_size(self) -> int:
            return sum(size for _, size in self.planned)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(fn, BlockMetadata(num_rows=None, size_bytes=size, input_files=None, exec_stats=None))
                for fn, size in self.planned
            ]

    return ConversationDatasource()


# ---------------------------------------------------------------- entry point


def read_source(source: SourceSpec, read: ReadSpec, normalize: NormalizeSpec):
    """A Ray Dataset of records (our schema) for one source; bad records are rows marked ``malformed:<why>``."""
    import ray.data

    if source.format == "parquet":
        ds = ray.data.read_parquet(list_files(source))
        fn = functools.partial(check_parquet_records, source=source.name, role_map=normalize.role_map)
        return map_records(ds, fn, stage="read", schema=RECORD_SCHEMA)
    files = ConversationFiles(source, read, cpus=int(cluster_cpus()))
    datasource = _make_datasource(files)
    ds = ray.data.read_datasource(datasource, override_num_blocks=files.num_blocks(len(datasource.planned)))
    fn = functools.partial(parse_raw_records, role_map=normalize.role_map, raw_keep_bytes=read.raw_keep_bytes)
    # The output schema is fixed (not inferred per block), so the sources can be unioned.
    return map_records(ds, fn, stage="read", schema=RECORD_SCHEMA)
