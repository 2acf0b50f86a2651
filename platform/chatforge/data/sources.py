"""Readers: conversation files -> raw rows -> records in our schema, streaming and split across Ray tasks.

Reading happens in two stages so that bad input never stops a run:
1. A Ray Data ``Datasource`` emits *raw* rows (the text of one record and where it came from). Plain JSONL files are
   cut into byte ranges, one read task each; a compressed JSONL file, a JSON array (or the top-level object of the
   chitchat corpus) is read by one streaming task per file that holds at most the current record, up to
   ``read.max_record_bytes``, and one chunk of the file.
2. ``formats.parse_raw_records`` (a pure per-batch function, mapped in parallel) turns each raw row into a record,
   or into a row with ``drop_reason="malformed:<why>"`` that keeps the raw text.

A Parquet file is read by a task of its own that emits records (checked by ``formats.check_parquet_records``) in our
schema: each file's batches keep their own column types (Ray Data's ``read_parquet`` makes one schema of all the
files first, and a file with an integer ``id`` beside one with a string ``id`` fails the whole read).

Each read task also reports how many rows it emitted (`ReadCounts`), so the curation's accounting can compare what
the readers emitted with what reached the write.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pyarrow as pa

from chatforge import storage
from chatforge.config import NormalizeSpec, ReadSpec, SourceSpec
from chatforge.data.batches import RecordBatchFn, map_records
from chatforge.data.formats import check_parquet_records, parquet_rows, parse_raw_records
from chatforge.data.schema import BASE_SCHEMA, STAGE_SECONDS_COLUMN, STAGE_SECONDS_TYPE, with_columns
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

# What a directory source reads, by file suffix in any case; the JSON formats' files may also be compressed.
EXTENSIONS = {
    "sharegpt": (".json", ".jsonl", ".ndjson"),
    "openai": (".jsonl", ".ndjson", ".json"),
    "parquet": (".parquet",),
    "chitchat": (".json",),
}
JSONL_SUFFIXES = (".jsonl", ".ndjson")  # always one record a line; a ".json" file is a JSON array if it opens with "["
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
BOM = b"\xef\xbb\xbf"


class SourceError(ValueError):
    """A source that cannot be read at all (missing path, no files); the message names it."""


def chitchat_corpus_path() -> str:
    """The conversation corpus shipped inside the `chitchat-dataset` PyPI package (a JSON object of 7k chats)."""
    import chitchat_dataset

    return os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")


def compression(path: str) -> str | None:
    """The codec of a compressed input ("gzip", "zstd"), by its suffix; None for a plain file."""
    return COMPRESSION_SUFFIXES.get(os.path.splitext(path)[1].lower())


def file_suffix(path: str) -> str:
    """The lower-case suffix that says what a file holds, under any compression suffix: "a.JSONL.gz" -> ".jsonl"."""
    stem, suffix = os.path.splitext(path)
    if suffix.lower() in COMPRESSION_SUFFIXES:
        suffix = os.path.splitext(stem)[1]
    return suffix.lower()


@dataclass(frozen=True)
class SourceFiles:
    files: list[str]
    skipped: list[str] = field(default_factory=list)  # files of a directory source that are not of its format


def scan_source(source: SourceSpec) -> SourceFiles:
    """The files of a source: a file, a glob's matches, or every file of its format in a directory (recursively;
    the others are listed as ``skipped``)."""
    if source.format == "chitchat" and source.path is None:
        return SourceFiles([chitchat_corpus_path()])
    assert source.path is not None
    path = storage.absolute(source.path) if storage.is_uri(source.path) else os.path.expanduser(source.path)
    skipped: list[str] = []
    if any(ch in path for ch in "*?["):
        if storage.is_uri(path):
            found = storage.glob_uri(path)
        else:
            found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif storage.isdir(path):
        found = []
        for full in storage.files_under(path):
            name = full.rsplit("/", 1)[-1]
            readable = file_suffix(name) in EXTENSIONS[source.format] and (
                source.format != "parquet" or compression(name) is None
            )
            (found if readable else skipped).append(full)
    elif storage.isfile(path):
        found = [path]
    else:
        raise SourceError(f"source {source.name!r}: {source.path} does not exist")
    if not found:
        kinds = "/".join(EXTENSIONS[source.format])
        raise SourceError(f"source {source.name!r}: no {kinds} files under {path} (skipped: {len(skipped)} others)")
    return SourceFiles(sorted(found), sorted(skipped))


def is_json_array(path: str) -> bool:
    """Whether a file holds one JSON array (a ".json" file opening with "["), not a record a line."""
    return file_suffix(path) not in JSONL_SUFFIXES and _first_significant_byte(path) == b"["


SNIFF_RECORDS = 20  # records a format is told from


def first_records(path: str, read: ReadSpec, limit: int = SNIFF_RECORDS) -> list[Any]:
    """The first ``limit`` records of a JSONL or JSON-array file that parse (a bad line is skipped)."""
    import itertools

    lines = iter_json_elements(path, read) if is_json_array(path) else iter_jsonl_stream(path, read)
    found = []
    for _, text, error in itertools.islice(lines, 4 * limit):
        if error is None:
            try:
                found.append(json.loads(text))
            except ValueError:
                continue
        if len(found) == limit:
            break
    return found


def sniff_format(records: list[Any]) -> str | None:
    """ "sharegpt" or "openai" when most of ``records`` hold that format's list of turns (``conversations`` or
    ``messages``); None when neither does."""
    from chatforge.data.formats import TURN_FORMATS

    counts = {
        fmt: sum(isinstance(r, dict) and list_key in r for r in records)
        for fmt, (_, list_key, _, _) in TURN_FORMATS.items()
    }
    best = max(counts, key=counts.get)
    return best if records and counts[best] * 2 > len(records) else None


def check_format(source: SourceSpec, files: list[str], read: ReadSpec) -> None:
    """A ShareGPT or OpenAI source whose first records are the other format stops here, naming the format to set:
    read as declared, every record would be dropped as ``malformed:missing_messages``."""
    from chatforge.data.formats import TURN_FORMATS

    if source.format not in TURN_FORMATS or not files:
        return
    records = first_records(files[0], read)
    seen = sniff_format(records)
    if seen is not None and seen != source.format:
        declared_key, seen_key = TURN_FORMATS[source.format][1], TURN_FORMATS[seen][1]
        raise SourceError(
            f"source {source.name!r} is read as {source.format}, whose records hold {declared_key!r}, but the first "
            f"records of {files[0]} hold {seen_key!r} ({TURN_FORMATS[seen][0]}): set its format to {seen} "
            f"(`--format {seen}` with --input)"
        )


def list_files(source: SourceSpec) -> list[str]:
    """The files a source reads (see `scan_source`)."""
    return scan_source(source).files


def open_input(path: str) -> BinaryIO:
    """A binary stream of a file's contents, decompressed when its suffix says it is compressed.

    A cut-off compressed file raises one of ``READ_ERRORS`` at the cut: gzip's own reader has handed over every byte
    before it by then; Arrow's zstd reader the bytes before its last read, so its reads are kept small.
    """
    codec = compression(path)
    if codec is None:
        return storage.open_binary(path)
    if codec == "gzip" and not storage.is_uri(path):
        return gzip.open(path, "rb")
    if storage.is_uri(path):  # an object in a store: Arrow decompresses the stream it reads
        fs, inner = storage.filesystem(path)
        return io.BufferedReader(fs.open_input_stream(inner, compression=codec), buffer_size=64 << 10)
    return io.BufferedReader(pa.input_stream(path, compression=codec), buffer_size=64 << 10)


def display_path(path: str) -> str:
    """``path`` as valid UTF-8 text (a file name that is not UTF-8 gets backslash escapes), for ``meta.origin``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- raw readers (run inside Ray read tasks)

# A read that fails mid-file (a corrupt or cut-off compressed stream, an I/O error) ends that file with one
# "read_error" row; these are what such a read raises.
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def _first_significant_byte(path: str) -> bytes:
    try:
        with open_input(path) as f:
            first = True
            while chunk := f.read(4096):
                stripped = (chunk.removeprefix(BOM) if first else chunk).lstrip()
                first = False
                if stripped:
                    return stripped[:1]
    except READ_ERRORS:
        pass  # read as JSONL: the read task reports the error
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


def _skip_line(f: BinaryIO) -> int:
    """Read up to and including the next newline, a MiB at a time; the bytes skipped."""
    skipped = 0
    while chunk := f.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _jsonl_lines(f: BinaryIO, offset: int, end: int | None, read: ReadSpec) -> Iterator[tuple[int, str, str | None]]:
    """(byte offset, text, error) for each non-blank line of ``f`` that starts before ``end`` (None: to the end)."""
    limit = read.max_record_bytes
    at_start = offset == 0
    try:
        while end is None or offset < end:
            line = f.readline(limit + 1)
            if not line:
                return
            start, offset = offset, offset + len(line)
            too_large = len(line) > limit and not line.endswith(b"\n")
            if at_start:
                line, at_start = line.removeprefix(BOM), False  # a byte-order mark is no part of the first record
            if too_large:
                offset += _skip_line(f)
                yield start, line[: read.raw_keep_bytes].decode("utf-8", "replace"), "record_too_large"
                continue
            if not line.strip():
                continue
            try:
                text, error = line.decode("utf-8"), None
            except UnicodeDecodeError:
                text, error = line.decode("utf-8", "replace"), "invalid_utf8"
            yield start, text.rstrip("\r\n"), error
    except READ_ERRORS as err:
        yield offset, f"{type(err).__name__}: {err}", "read_error"


def iter_jsonl_range(path: str, start: int, end: int, read: ReadSpec) -> Iterator[tuple[int, str, str | None]]:
    """Yield (byte offset, text, error) for each line of a plain file that *starts* in [start, end).

    A range that begins mid-line skips to the next line: that line belongs to the range it started in.
    """
    with storage.open_binary(path) as f:
        offset = start
        if start > 0:
            f.seek(start - 1)
            offset = start - 1 + _skip_line(f)
        yield from _jsonl_lines(f, offset, end, read)


def iter_jsonl_stream(path: str, read: ReadSpec) -> Iterator[tuple[int, str, str | None]]:
    """Yield (byte offset in the decompressed text, text, error) for each line of a (compressed) file."""
    with open_input(path) as f:
        yield from _jsonl_lines(f, 0, None, read)


# JSON's structure is ASCII, and no byte of a multi-byte UTF-8 character is: the scanner reads bytes. Each pattern
# skips whole strings and other text up to the next byte that matters: a bracket, a comma where one separates
# elements, or the quote of a string that runs past the chunk's end. Possessive quantifiers never backtrack, so a
# failed match costs its length once, and matches (not searches) never retry from later positions.
_STRING = rb'"[^"\\]*+(?:\\[\s\S][^"\\]*+)*+"'
_NEXT_AT_TOP = re.compile(rb'(?:[^"\[\]{},]++|' + _STRING + rb')*+[\[\]{},"]')
_NEXT_NESTED = re.compile(rb'(?:[^"\[\]{}]++|' + _STRING + rb')*+[\[\]{}"]')
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\[\s\S][^"\\]*+)*+')  # inside a string: up to its end or a final "\"
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_QUOTE, _COMMA, _OPENERS, _CLOSERS = 0x22, 0x2C, b"[{", b"]}"


class _ElementScanner:
    """Finds the top-level elements of a JSON array (members of an object) in chunks of bytes, in one pass.

    Only strings, brackets and commas are looked at, in one pass over the bytes; an element's content is left to
    ``json.loads``. The element being read is buffered until it passes ``read.max_record_bytes``; then only its
    head is kept.
    """

    def __init__(self, read: ReadSpec):
        self.read = read
        self.depth = 0  # 0: between top-level values
        self.in_string = False
        self.escaped = False  # the chunk ended on a string's backslash
        self.values = 0  # top-level values begun
        self.junk: str | None = None  # set once bytes that open no array or object are met at the top level
        self.parts: list[bytes] = []  # the current element's bytes, while it is within the limit
        self.size = 0  # bytes of the current element, buffered or not
        self.head: bytes | None = None  # the kept head of an element over the limit

    def feed(self, chunk: bytes) -> Iterator[tuple[str, str | None]]:
        """The elements that end in ``chunk``, as (text, error)."""
        view, n, pos = memoryview(chunk), len(chunk), 0
        begin: int | None = 0 if self.depth or self.junk is not None else None  # the element's start in chunk
        while pos < n and self.junk is None:
            if self.in_string:
                if self.escaped:
                    pos, self.escaped = pos + 1, False
                    continue
                pos = _STRING_REST.match(chunk, pos).end()
                if pos < n:
                    self.in_string = chunk[pos] != _QUOTE
                    self.escaped = self.in_string  # else a backslash, the chunk's last byte
                    pos += 1
                continue
            if self.depth == 0:
                found = _NOT_SPACE.search(chunk, pos)
                if found is None:
                    break
                pos = found.start()
                if chunk[pos] in _OPENERS:
                    self.depth, self.values, pos = 1, self.values + 1, pos + 1
                    begin = pos
                else:  # not JSON's structure: everything from here to the end is one more "element"
                    self.junk = "trailing_data" if self.values else ""
                    begin = pos
                continue
            token = (_NEXT_AT_TOP if self.depth == 1 else _NEXT_NESTED).match(chunk, pos)
            if token is None:
                break
            pos = token.end()
            byte = chunk[pos - 1]
            if byte == _QUOTE:
                self.in_string = True
            elif byte in _OPENERS:
                self.depth += 1
            elif byte in _CLOSERS and self.depth > 1:
                self.depth -= 1
            else:  # a comma between elements, or the end of the top-level array or object
                self._add(view[begin : pos - 1])
                yield from self._finish(None)
                begin = pos if byte == _COMMA else None
                self.depth -= byte != _COMMA
        if begin is not None:
            self._add(view[begin:])

    def close(self) -> Iterator[tuple[str, str | None]]:
        """At the end of the input: the element it cut off ("truncated"), or the bytes after the last value."""
        if self.junk is not None:
            yield from self._finish(self.junk or None)
        elif self.depth > 0:
            yield from self._finish("truncated")

    def _add(self, part: memoryview) -> None:
        if not self.size:  # the whitespace before an element is no part of it
            start = _NOT_SPACE.search(part)
            part = part[start.start() :] if start else part[:0]
        self.size += len(part)
        if self.head is not None or not part:
            return
        if self.size <= self.read.max_record_bytes:
            self.parts.append(bytes(part))
            return
        keep = self.read.raw_keep_bytes
        head = bytearray()
        for held in [*self.parts, part]:
            head += held[: keep - len(head)]
        self.head, self.parts = bytes(head), []

    def _finish(self, error: str | None) -> Iterator[tuple[str, str | None]]:
        parts, head = self.parts, self.head
        self.parts, self.head, self.size = [], None, 0
        if head is not None:
            yield head.decode("utf-8", "replace"), "record_too_large"
            return
        raw = parts[0] if len(parts) == 1 else b"".join(parts)
        del parts  # the parts or the joined copy, never both, next to the decoded text
        try:
            text = raw.decode("utf-8").strip(" \t\r\n")
        except UnicodeDecodeError:
            text, error = raw.decode("utf-8", "replace").strip(" \t\r\n"), error or "invalid_utf8"
        del raw
        if text:
            yield (text[: self.read.raw_keep_bytes] if error == "truncated" else text), error


def iter_json_elements(path: str, read: ReadSpec, chunk_bytes: int = 1 << 20) -> Iterator[tuple[int, str, str | None]]:
    """Yield (element number, raw text, error) for each element of a top-level JSON array or object, streaming.

    For an object, an element is a ``"key": value`` member. Time is linear in the file's size; memory is one chunk
    plus the current element, up to ``read.max_record_bytes``, and its text: a larger element is reported (its head
    kept) as
    "record_too_large". A file cut off mid-element yields the partial element as "truncated"; bytes after the last
    top-level value that open no array or object are one more element, "trailing_data"; a read that fails ends the
    file with a "read_error" element.
    """
    scanner = _ElementScanner(read)
    number = 0
    with open_input(path) as f:
        try:
            chunk = f.read(len(BOM)).removeprefix(BOM)  # a byte-order mark is no part of the first element
            while True:
                for text, error in scanner.feed(chunk):
                    number += 1
                    yield number, text, error
                if not (chunk := f.read(chunk_bytes)):
                    break
        except READ_ERRORS as err:
            yield number + 1, f"{type(err).__name__}: {err}", "read_error"
            return
    for text, error in scanner.close():
        number += 1
        yield number, text, error


# ---------------------------------------------------------------- read tasks, and what they emitted


@dataclass
class ReadCounts:
    """How many records the readers emitted, counted where they emit them, apart from the dataset's rows.

    Each read task writes its count to ``directory`` once it has read its part (the file is named by the task, so a
    retried task overwrites it). The curation compares the total with the rows that reached the write.
    """

    directory: str
    expected: dict[str, str] = field(default_factory=dict)  # task key -> the file and range it reads

    def total(self) -> tuple[int, list[str]]:
        """(records emitted, the parts whose task never reported)."""
        emitted, missing = 0, []
        for key, what in self.expected.items():
            try:
                with open(os.path.join(self.directory, f"{key}.json"), encoding="utf-8") as f:
                    emitted += json.load(f)["records"]
            except FileNotFoundError:
                missing.append(what)
        return emitted, missing


def _task_key(path: str, start: int) -> str:
    return hashlib.blake2b(f"{path}\0{start}".encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


def _report_count(counts_dir: str | None, key: str, emitted: int) -> None:
    if counts_dir is not None:
        target = os.path.join(counts_dir, f"{key}.json")
        with open(f"{target}.tmp", "w", encoding="utf-8") as f:
            json.dump({"records": emitted}, f)
        os.replace(f"{target}.tmp", target)


def _counted(rows: Iterator[dict[str, Any]], counts_dir: str | None, key: str) -> Iterator[dict[str, Any]]:
    emitted = 0
    for row in rows:
        emitted += 1
        yield row
    _report_count(counts_dir, key, emitted)


def _jsonl_task(
    path: str, start: int, end: int | None, source: str, fmt: str, read: ReadSpec, counts_dir: str | None = None
) -> Iterator[pa.Table]:
    """One range of a plain JSONL file, or (``end`` None) a whole compressed one."""
    lines = iter_jsonl_range(path, start, end, read) if end is not None else iter_jsonl_stream(path, read)
    origin = display_path(path)
    rows = (_raw_row(source, fmt, f"{origin}@byte={offset}", text, error) for offset, text, error in lines)
    yield from _blocks(_counted(rows, counts_dir, _task_key(path, start)), read.block_rows)


def _json_task(path: str, source: str, fmt: str, read: ReadSpec, counts_dir: str | None = None) -> Iterator[pa.Table]:
    origin = display_path(path)
    rows = (
        _raw_row(source, fmt, f"{origin}#record={number}", text, error)
        for number, text, error in iter_json_elements(path, read)
    )
    yield from _blocks(_counted(rows, counts_dir, _task_key(path, 0)), read.block_rows)


PARQUET_COLUMNS = ("id", "messages", "meta")  # what a Parquet source's rows are read for


def _parquet_task(
    path: str, source: str, read: ReadSpec, role_map: dict[str, str], counts_dir: str | None = None
) -> Iterator[pa.Table]:
    """One Parquet file, batch by batch, as records in our schema (each batch with the file's own column types)."""
    import pyarrow.parquet as pq

    origin, emitted = display_path(path), 0
    try:
        parquet = pq.ParquetFile(storage.open_binary(path))
        columns = [name for name in PARQUET_COLUMNS if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=read.block_rows, columns=columns):
            check = functools.partial(
                check_parquet_records, source=source, role_map=role_map, origin=origin, first_row=emitted
            )
            table = RecordBatchFn(check, stage="read", schema=RECORD_SCHEMA, to_records=parquet_rows)(
                pa.Table.from_batches([batch])
            )
            emitted += table.num_rows
            yield table
    except (*READ_ERRORS, pa.ArrowException) as err:  # the rest of the file cannot be read: one row says so
        row = _raw_row(source, "parquet", f"{origin}#row={emitted}", f"{type(err).__name__}: {err}", "read_error")
        emitted += 1
        yield pa.Table.from_pylist(parse_raw_records([row], role_map, read.raw_keep_bytes), schema=RECORD_SCHEMA)
    _report_count(counts_dir, _task_key(path, 0), emitted)


# A JSONL range below this is not worth a task of its own: Ray Data's per-task costs (scheduling, a staged file
# each) then outweigh the work: the curation benchmark's first pass took 1.7x the CPU on 1 MiB blocks that it takes on
# 26 MiB ones.
MIN_RANGE_BYTES = 4 << 20


@dataclass
class ReadTask:
    fn: functools.partial
    size: int
    key: str  # names the task's count file (see `ReadCounts`)
    what: str  # the file and range, for messages


@dataclass
class ConversationFiles:
    """One source's files as Ray Data read tasks: plain JSONL byte ranges, or one streaming task per JSON document
    or compressed file.

    ``cpus`` is the cluster's CPU count: JSONL ranges are cut to give every CPU about two tasks (see
    `range_bytes`). ``counts_dir``: where each task reports how many records it emitted (None: nowhere).
    ``role_map``: extra role names, for the Parquet tasks (which emit records; the others' rows are parsed after).
    """

    source: SourceSpec
    read: ReadSpec
    cpus: int = 1
    counts_dir: str | None = None
    role_map: dict[str, str] = field(default_factory=dict)

    def plan(self) -> list[ReadTask]:
        planned = []
        ranged: list[tuple[str, int]] = []
        args = (self.source.name, self.source.format, self.read, self.counts_dir)
        for path in list_files(self.source):
            size = storage.size(path)
            if self.source.format == "parquet":
                _check_parquet(path, self.source)
                fn = functools.partial(_parquet_task, path, self.source.name, self.read, self.role_map, self.counts_dir)
                planned.append(ReadTask(fn, size, _task_key(path, 0), path))
            elif self.source.format == "chitchat" or is_json_array(path):
                planned.append(ReadTask(functools.partial(_json_task, path, *args), size, _task_key(path, 0), path))
            elif compression(path) is not None:
                fn = functools.partial(_jsonl_task, path, 0, None, *args)
                planned.append(ReadTask(fn, size, _task_key(path, 0), path))
            else:
                ranged.append((path, size))
        range_bytes = self.range_bytes(sum(size for _, size in ranged))
        for path, size in ranged:
            for start in range(0, max(size, 1), range_bytes):
                end = min(start + range_bytes, size)
                fn = functools.partial(_jsonl_task, path, start, end, *args)
                planned.append(ReadTask(fn, end - start, _task_key(path, start), f"{path} bytes {start}-{end}"))
        return planned

    def tasks(self) -> list[tuple[functools.partial, int]]:
        """(read function, bytes it reads) per task."""
        return [(task.fn, task.size) for task in self.plan()]

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


def _make_datasource(files: ConversationFiles, planned: list[ReadTask]):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource
    from ray.data.datasource import ReadTask as RayReadTask

    class ConversationDatasource(Datasource):
        def get_name(self) -> str:
            return f"Read{files.source.format.capitalize()}"

        def estimate_inmemory_data_size(self) -> int:
            return sum(task.size for task in planned)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                RayReadTask(
                    task.fn, BlockMetadata(num_rows=None, size_bytes=task.size, input_files=None, exec_stats=None)
                )
                for task in planned
            ]

    return ConversationDatasource()


# ---------------------------------------------------------------- entry point


def _check_parquet(path: str, source: SourceSpec) -> None:
    """A file that is not Parquet at all fails here, naming it, before any task runs."""
    import pyarrow.parquet as pq

    try:
        with storage.open_binary(path) as f:
            pq.read_metadata(f)
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"source {source.name!r}: {path} is not a readable Parquet file: {err}") from None


DATASET_FORMAT = "dataset"  # a source given as a Ray Dataset (`read_dataset_source`), as manifests name it
_HASH_MODULUS = 1 << 128


def _rows_digest(table: pa.Table) -> pa.Table:
    """One row: the block's row count and the sum (mod 2^128) of its rows' 128-bit hashes, so the sum over the
    blocks fingerprints the rows whatever the blocks and their order."""
    total = 0
    for row in parquet_rows(table):
        text = json.dumps(row, sort_keys=True, default=str, ensure_ascii=False)
        total += int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    return pa.table({"rows": [table.num_rows], "digest": [str(total % _HASH_MODULUS)]})


@dataclass(frozen=True)
class DatasetSource:
    """A source given as a Ray Dataset of conversations, counted and fingerprinted (`dataset_source`)."""

    name: str
    dataset: Any  # ray.data.Dataset
    rows: int
    fingerprint: str


def dataset_source(name: str, ds) -> DatasetSource:
    """``ds`` counted and fingerprinted in one pass over it (the curation runs it again, so a costly dataset is best
    materialized first)."""
    parts = ds.map_batches(_rows_digest, batch_format="pyarrow", batch_size=None).take_all()
    total = sum(int(part["digest"]) for part in parts) % _HASH_MODULUS
    return DatasetSource(name, ds, sum(part["rows"] for part in parts), f"{total:032x}")


def read_dataset_source(source: DatasetSource, normalize: NormalizeSpec, counts: ReadCounts | None = None):
    """A Ray Dataset of conversations as records, checked like a Parquet source's rows: ``messages`` (a list of
    ``{role, content}``) and optionally ``id`` and ``meta`` (a JSON object as a string); other columns are not read.
    A row out of that shape becomes a ``malformed:<why>`` row."""
    if counts is not None:  # counted up front: the accounting checks that every row reaches the write
        key = _task_key(f"{DATASET_FORMAT}:{source.name}", 0)
        counts.expected[key] = f"the dataset {source.name!r}"
        _report_count(counts.directory, key, source.rows)
    names = source.dataset.schema().names
    if "messages" not in names:
        raise SourceError(f"source {source.name!r}: the dataset has no `messages` column (its columns: {names})")
    check = functools.partial(
        check_parquet_records, source=source.name, role_map=normalize.role_map, origin=f"{DATASET_FORMAT}:{source.name}"
    )
    return source.dataset.select_columns([column for column in PARQUET_COLUMNS if column in names]).map_batches(
        RecordBatchFn(check, stage="read", schema=RECORD_SCHEMA, to_records=parquet_rows), batch_format="pyarrow"
    )


def read_source(source: SourceSpec, read: ReadSpec, normalize: NormalizeSpec, counts: ReadCounts | None = None):
    """A Ray Dataset of records (our schema) for one source; bad records are rows marked ``malformed:<why>``.

    ``counts`` hears what the readers will emit (see `ReadCounts`).
    """
    import ray.data

    files = ConversationFiles(
        source, read, cpus=int(cluster_cpus()), counts_dir=counts and counts.directory, role_map=normalize.role_map
    )
    planned = files.plan()
    if counts is not None:
        counts.expected.update({task.key: task.what for task in planned})
    ds = ray.data.read_datasource(_make_datasource(files, planned), override_num_blocks=files.num_blocks(len(planned)))
    if source.format == "parquet":
        return ds  # its read tasks emit records
    fn = functools.partial(parse_raw_records, role_map=normalize.role_map, raw_keep_bytes=read.raw_keep_bytes)
    # The output schema is fixed (not inferred per block), so the sources can be unioned.
    return map_records(ds, fn, stage="read", schema=RECORD_SCHEMA)
