"""Deduplication: exact copies by a hash of the normalized text, near copies by MinHash LSH + connected components.

Only kept rows take part; nothing is removed. A duplicate gets ``drop_reason`` "duplicate:exact" or
"duplicate:near" (first reason wins) and ``dup_of`` = the id of the row its group keeps, the smallest id.

Dedup needs every row before it can mark any, yet the rows themselves must stream. So the rows go to disk once and
only their keys take part in the global work (hash-partitioned shuffles and per-block passes in Ray Data; no
driver-side set of hashes or edges, no per-group Python ``map_groups``):

1. one streaming pass adds a row key, the exact hash and the MinHash signature (the hot loop, vectorised) and
   writes the rows to a staging directory as Parquet;
2. the key columns are read back (row, hash, signature) and hash-partitioned by hash; each block links every copy
   to the smallest row of its hash (exact edges) and passes the representatives on;
3. representatives explode to one row per LSH band (band key, row, a 4-bit-per-slot sketch of the signature),
   hash-partitioned by band key (as many bands per shuffle as fit a fixed byte budget); each block verifies the pairs sharing a bucket by
   estimated Jaccard;
4. connected components over exact + near edges (`chatforge.data.components`) label each row with its group's
   smallest row, so chains a~b~c end as one group and exact copies point at the row their group keeps;
5. the marks (one small row per duplicate) are broadcast by object reference, and the staged rows stream back
   from disk through a per-block pass that applies them: full rows are never shuffled nor held in memory.

When every shuffle of steps 2-4 would be one partition (key rows of up to ~30k conversations; `ShufflePlan`), one
Ray task runs steps 2-4 on the key columns with the same per-block functions (`marks_block`): each shuffle would
be one block in one task anyway, and a Ray Data execution per shuffle costs ~0.1-0.2 s with the cores mostly idle.

Every function above the `DedupStep` is pure (no Ray) and unit-tested.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import xxhash
from ray.data import Dataset
from ray.data.expressions import col

from chatforge.config import DedupSpec
from chatforge.data.components import (
    PARTITION_BYTES,
    block_components,
    block_refs,
    connected_components,
    hash_partitioned,
    partitions_for,
    report_rounds,
)
from chatforge.data.schema import STAGE_SECONDS_COLUMN, STAGE_SECONDS_TYPE

logger = logging.getLogger(__name__)

STAGE = "dedup"
DUP_OF = "dup_of"
EXACT_REASON = "duplicate:exact"
NEAR_REASON = "duplicate:near"

# Temporary columns, all removed before the step returns. A row key is "<id>\0<meta hash>\0<batch>.<n>": unique even
# when two rows share an id (ids fall back to a content hash, so identical records from one source do), and its
# string order is the id order, so "smallest row key" means "smallest id".
ROW, HASH, SIG, REP, BAND = "_dedup_row", "_dedup_hash", "_dedup_sig", "_dedup_rep", "_dedup_band"
SKETCH, LABEL, EXACT = "_dedup_sketch", "_dedup_label", "_dedup_exact"
_KEY_SEPARATOR = "\x00"
_EDGE_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string())])
# A mark: row ROW is a duplicate; of LABEL (a row key) when known, and EXACT when it is an exact copy.
_MARK_SCHEMA = pa.schema([(ROW, pa.string()), (LABEL, pa.string()), (EXACT, pa.bool_())])

_MAX_HASH = np.uint32(0xFFFFFFFF)
_SHINGLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: shingle hash = polynomial in word hashes
_BAND_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-1a's prime, to mix the values of a band into one key
_SHINGLES_PER_CHUNK = 1 << 16  # bounds the (num_perm x shingles) matrix of one chunk to num_perm * 256 KiB
# The band rows (one per row per LSH band) are the largest thing dedup moves; bands go through the shuffle in groups
# of about this many bytes, each group's edges materialized before the next (see DedupStep._marks). One partition's
# worth: a group then needs no keyed shuffle until a single band outgrows a partition. Larger groups put several
# partitions' worth of bands through one keyed shuffle, whose map task and worker pool then make most of a large
# run's peak memory (docs/benchmarks.md).
BAND_SHUFFLE_BYTES = PARTITION_BYTES
# Rows per staged file. The final pass reads one file per task and runs every step after dedup on it, so this bounds
# that task's memory whatever the size of the read range the rows came from.
STAGED_FILE_ROWS = 8192


# ---------------------------------------------------------------- normalized text and the exact key


def normalize_text(text: str | None) -> str:
    """NFKC, lower case, whitespace runs collapsed to one space: copies that differ only in these hash equal."""
    return " ".join(unicodedata.normalize("NFKC", text or "").lower().split())


def normalized_conversation(messages: Sequence[dict[str, str]]) -> str:
    """Roles and contents, one normalized turn per line (contents hold no newline once normalized)."""
    return "\n".join(f"{normalize_text(m['role'])}: {normalize_text(m['content'])}" for m in messages)


def _digest(text: str) -> str:
    return xxhash.xxh64_hexdigest(text.encode("utf-8"))


def text_hash(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def exact_key(messages: Sequence[dict[str, str]]) -> str:
    """The exact-duplicate key of a conversation."""
    return text_hash(normalized_conversation(messages))


# ---------------------------------------------------------------- MinHash signatures and LSH bands


def shingle_hashes(texts: Sequence[str], shingle_words: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every run of ``shingle_words`` consecutive words of each text, vectorised over the batch.

    Returns ``(hashes, offsets)``: text i's shingles are ``hashes[offsets[i]:offsets[i + 1]]``. A text shorter
    than a shingle gets one shingle of all its words; a text without words gets none.
    """
    k = shingle_words
    # Arrow's split keeps an empty word at a leading/trailing space and for "": trim, and null out blank texts.
    trimmed = pc.utf8_trim_whitespace(pa.array(texts, pa.string()))
    words = pc.utf8_split_whitespace(pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed))
    word_offsets = words.offsets.to_numpy().astype(np.int64)
    counts = np.diff(word_offsets)
    # Hash each distinct word once (a batch repeats its vocabulary), then gather.
    encoded = pc.dictionary_encode(words.flatten())
    vocabulary = encoded.dictionary.cast(pa.binary()).to_pylist()
    vocab_hashes = np.fromiter(map(xxhash.xxh64_intdigest, vocabulary), dtype=np.uint64, count=len(vocabulary))
    word_hashes = vocab_hashes[encoded.indices.to_numpy()]

    # Lay the texts out with k-1 zero words after each, so a window never reaches into the next text.
    padded_starts = np.concatenate([[0], np.cumsum(counts + k - 1)])
    padded = np.zeros(padded_starts[-1] + k, dtype=np.uint64)
    padded[np.arange(len(word_hashes)) + np.repeat(padded_starts[:-1] - word_offsets[:-1], counts)] = word_hashes
    windows = padded_starts[-1]
    rolled = padded[:windows].copy()
    for j in range(1, k):
        rolled = rolled * _SHINGLE_MULTIPLIER + padded[j : j + windows]

    per_text = np.where(counts == 0, 0, np.maximum(counts - k + 1, 1))
    offsets = np.concatenate([[0], np.cumsum(per_text)])
    starts = np.repeat(padded_starts[:-1] - offsets[:-1], per_text) + np.arange(offsets[-1])
    folded = rolled[starts] ^ (rolled[starts] >> np.uint64(32))
    return folded.astype(np.uint32), offsets  # astype keeps the low 32 bits


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's "affine32" permutations (h -> a*h + b mod 2^32, a odd), so signatures match its MinHash.

    Imported here, not at the top: datasketch's package imports its LSH classes and with them scipy (0.35 s), which
    every worker that unpickles a dedup function would pay, though only the signature pass needs this."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return a.astype(np.uint32)[:, None], b.astype(np.uint32)[:, None]


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer, the pre-mix datasketch applies before its permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_signatures(texts: Sequence[str], num_perm: int, shingle_words: int, seed: int = 1) -> np.ndarray:
    """``(len(texts), num_perm)`` uint32 MinHash signatures of the texts' word shingles.

    Equal to datasketch's ``MinHash(num_perm, seed)`` fed the same shingle hashes, but computed for the whole
    batch at once with numpy: about twice as fast as datasketch's ``MinHash.bulk`` on the same hashes
    (docs/benchmarks.md). A text without words gets the all-max signature; callers keep such texts out of the near
    stage.
    """
    hashes, offsets = shingle_hashes(texts, shingle_words)
    a, b = _permutations(num_perm, seed)
    mixed = _fmix32(hashes)
    signatures = np.full((len(texts), num_perm), _MAX_HASH, dtype=np.uint32)
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    starts = offsets[nonempty]
    first = 0
    while first < len(nonempty):
        last = max(first + 1, int(np.searchsorted(starts, starts[first] + _SHINGLES_PER_CHUNK)))
        lo, hi = starts[first], offsets[nonempty[last - 1] + 1]
        permuted = a * mixed[None, lo:hi] + b  # (num_perm, shingles); uint32 arithmetic wraps mod 2^32
        signatures[nonempty[first:last]] = np.minimum.reduceat(permuted, starts[first:last] - lo, axis=1).T
        first = last
    return signatures


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature slots (rows of ``a`` against rows of ``b``)."""
    return np.mean(a == b, axis=-1)


def sketch(signatures: np.ndarray) -> np.ndarray:
    """The low 4 bits of every slot, two slots a byte: an eighth of the signature's bytes, which is what the LSH
    band rows (one per band per row) carry for verification. See `sketch_jaccard`."""
    nibbles = (signatures & np.uint32(0xF)).astype(np.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros(nibbles.shape[:-1] + (1,), np.uint8)], axis=-1)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << np.uint8(4))


def sketch_jaccard(a: np.ndarray, b: np.ndarray, num_perm: int) -> np.ndarray:
    """Estimated Jaccard from two sketches: b-bit minwise hashing (Li & König 2010). Two different slot values
    still agree in their low 4 bits 1 time in 16, which the estimate takes out; its error stays close to that of
    the full signature (the slot count dominates it)."""
    differ = np.bitwise_xor(a, b)
    same = np.stack([(differ & np.uint8(0xF)) == 0, (differ >> np.uint8(4)) == 0], axis=-1)
    agree = same.reshape(same.shape[:-2] + (-1,))[..., :num_perm].mean(axis=-1)
    return np.maximum((agree - 1 / 16) / (1 - 1 / 16), 0.0)


def band_keys(signatures: np.ndarray, bands: int, first: int = 0, last: int | None = None) -> np.ndarray:
    """``(n, last - first)`` int64 bucket keys of bands ``first:last`` (all by default): a hash of the band's index
    and its ``num_perm / bands`` values. Only those bands' slots are read.

    Two texts share a bucket in some band with probability 1 - (1 - J^rows)^bands for Jaccard J.
    """
    n, num_perm = signatures.shape
    last = bands if last is None else min(last, bands)
    rows = num_perm // bands
    banded = signatures[:, first * rows : last * rows].reshape(n, last - first, rows).astype(np.uint64)
    indices = np.arange(first + 1, last + 1, dtype=np.uint64)
    keys = np.broadcast_to(indices * _SHINGLE_MULTIPLIER, (n, last - first))
    for value in np.moveaxis(banded, 2, 0):
        keys = (keys ^ value) * _BAND_MULTIPLIER
    return (keys ^ (keys >> np.uint64(29))).view(np.int64)


# ---------------------------------------------------------------- per-block logic after a hash partition


def smallest_per_key(keys: Sequence[str] | pa.Array, rows: Sequence[str] | pa.Array) -> pa.Array:
    """For each row, the smallest row with the same key, or null when it is that row (the one to keep)."""
    table = pa.table({"key": keys, "row": rows})
    smallest = table.group_by("key").aggregate([("row", "min")])
    representative = smallest["row_min"].take(pc.index_in(table["key"], value_set=smallest["key"]))
    is_itself = pc.equal(representative, table["row"]).combine_chunks()
    return pc.if_else(is_itself, pa.scalar(None, pa.string()), representative.combine_chunks())


def row_nodes(rows: Sequence[str] | pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """The distinct row keys in sorted order, each row's index into them, and each distinct key's first row.

    Arrow's dictionary encoding, not Python strings: a band shuffle's partition holds ~0.5M band rows, whose keys
    as Python objects would take ~120 MB of a task's memory beside the 63 MB of Arrow they come from."""
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    elif not isinstance(rows, pa.Array):
        rows = pa.array(rows, pa.string())
    encoded = pc.dictionary_encode(rows)
    order = pc.array_sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    node_of = rank[encoded.indices.to_numpy()]
    _, first = np.unique(node_of, return_index=True)  # every node occurs, so this is indexed by node
    return encoded.dictionary.take(pa.array(order)), node_of, first


def verified_edges(
    keys: np.ndarray,
    rows: Sequence[str] | pa.Array | pa.ChunkedArray,
    signatures: np.ndarray | pa.Array | pa.ChunkedArray,
    threshold: float,
    similarity=estimated_jaccard,
) -> pa.Table:
    """Near-duplicate edges ``src, dst`` among one block of band rows (``keys[i]`` is row i's bucket in one band).

    Rows sharing a bucket are candidate pairs, kept when their estimated Jaccard reaches ``threshold``. Kept
    pairs are merged within this block (union-find over the block only) and each row is linked to the smallest row
    of its local group: fewer edges, and shallow components for the global connected-components rounds.
    ``signatures`` may be a fixed-size list column: only each distinct row's first one is then made a matrix (a row
    repeats in every band of the block, with the same sketch).
    """
    names, node_of, first = row_nodes(rows)
    if isinstance(signatures, np.ndarray):
        node_signatures = signatures[first]
    else:
        node_signatures = _signature_matrix(signatures.take(pa.array(first)))
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_nodes = keys[order], node_of[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    # Pair every row with each later row of its bucket, one offset at a time: vectorised, and the loop runs only
    # as many times as the largest bucket is long.
    later_in_bucket = np.repeat(starts + sizes, sizes) - np.arange(len(keys)) - 1
    position, offset, pairs = np.flatnonzero(later_in_bucket > 0), 1, []
    while position.size:
        pairs.append(np.stack([sorted_nodes[position], sorted_nodes[position + offset]], axis=1))
        position = position[later_in_bucket[position] > offset]
        offset += 1
    if not pairs:
        return _EDGE_SCHEMA.empty_table()
    pairs = np.sort(np.concatenate(pairs), axis=1)
    pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)  # a pair shares buckets in several bands
    similar = np.concatenate(
        [
            similarity(node_signatures[chunk[:, 0]], node_signatures[chunk[:, 1]]) >= threshold
            for chunk in np.array_split(pairs, max(1, len(pairs) // 65536))
        ]
    )
    parent = list(range(len(names)))  # union by smaller index; names are sorted, so the root is the smallest row

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for u, v in pairs[similar].tolist():
        ru, rv = root(u), root(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    linked = np.unique(pairs[similar])
    roots = np.array([root(node) for node in linked.tolist()], dtype=linked.dtype)
    moved = roots != linked
    return pa.table([names.take(pa.array(linked[moved])), names.take(pa.array(roots[moved]))], schema=_EDGE_SCHEMA)


# ---------------------------------------------------------------- Arrow batch functions the step maps


def _signature_array(signatures: np.ndarray, present: np.ndarray) -> pa.FixedSizeListArray:
    """Signatures (one row per True in ``present``) as a fixed-size list column with nulls elsewhere."""
    full = np.zeros((len(present), signatures.shape[1]), dtype=np.uint32)
    full[present] = signatures
    return pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), signatures.shape[1], mask=pa.array(~present))


def _signature_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy().reshape(len(array), array.type.list_size)


def _charge_seconds(table: pa.Table, seconds: float) -> pa.Table:
    """Add this batch's time to the first row's ``_stage_seconds`` (see schema.py)."""
    if table.num_rows == 0:
        return table
    if STAGE_SECONDS_COLUMN in table.column_names:
        column = table[STAGE_SECONDS_COLUMN]
        timings = dict(column[0].as_py() or [])
        rest = column.slice(1).chunks
    else:
        timings, rest = {}, [pa.nulls(table.num_rows - 1, STAGE_SECONDS_TYPE)]
    timings[STAGE] = timings.get(STAGE, 0.0) + seconds
    merged = pa.chunked_array([pa.array([list(timings.items())], STAGE_SECONDS_TYPE), *rest], STAGE_SECONDS_TYPE)
    if STAGE_SECONDS_COLUMN in table.column_names:
        return table.set_column(table.schema.get_field_index(STAGE_SECONDS_COLUMN), STAGE_SECONDS_COLUMN, merged)
    return table.append_column(STAGE_SECONDS_COLUMN, merged)


@dataclass(frozen=True)
class KeyRows:
    """Adds the row key, and for kept rows the exact hash and (if ``near``) the MinHash signature."""

    spec: DedupSpec

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        ids = [i or "" for i in table["id"].to_pylist()]
        metas = table["meta"].to_pylist() if "meta" in table.column_names else [None] * len(ids)
        batch = _digest("\n".join(ids))  # tells apart rows whose id and meta are both equal
        row_keys = [
            _KEY_SEPARATOR.join((i, _digest(m or ""), f"{batch}.{n}"))
            for n, (i, m) in enumerate(zip(ids, metas, strict=True))
        ]
        kept = pc.is_null(table["drop_reason"]).to_pylist()
        texts = [
            normalized_conversation(messages) if is_kept and messages else None
            for is_kept, messages in zip(kept, table["messages"].to_pylist(), strict=True)
        ]
        present = np.array([text is not None for text in texts], dtype=bool)
        table = table.append_column(ROW, pa.array(row_keys, pa.string()))
        hashes = [text_hash(t) if t is not None else None for t in texts]
        table = table.append_column(HASH, pa.array(hashes, pa.string()))
        if self.spec.near:
            signatures = minhash_signatures(
                [t for t in texts if t is not None], self.spec.num_perm, self.spec.shingle_words
            )
            table = table.append_column(SIG, _signature_array(signatures, present))
        else:
            table = table.append_column(SIG, pa.nulls(table.num_rows, pa.list_(pa.uint32(), self.spec.num_perm)))
        return _charge_seconds(table, time.perf_counter() - started)


def exact_block(table: pa.Table) -> pa.Table:
    """Key rows of one hash partition: ``REP`` = the smallest row with the same exact hash (null for that row)."""
    return pa.table({ROW: table[ROW], REP: smallest_per_key(table[HASH], table[ROW]), SIG: table[SIG]})


def no_exact_block(table: pa.Table) -> pa.Table:
    """Key rows when exact dedup is off: every row is its own representative."""
    return pa.table({ROW: table[ROW], REP: pa.nulls(table.num_rows, pa.string()), SIG: table[SIG]})


def band_rows(table: pa.Table, bands: int, first: int = 0, last: int | None = None) -> pa.Table:
    """One row per (representative, band in ``first:last``): ``BAND`` key, row key, and the signature's sketch."""
    signatures = _signature_matrix(table[SIG])
    keys = band_keys(signatures, bands, first, last)
    repeated = np.repeat(sketch(signatures), keys.shape[1], axis=0)
    return pa.table(
        {
            BAND: pa.array(keys.ravel(), pa.int64()),
            ROW: table[ROW].take(np.repeat(np.arange(table.num_rows), keys.shape[1])),
            SKETCH: pa.FixedSizeListArray.from_arrays(pa.array(repeated.ravel()), repeated.shape[1]),
        }
    )


def near_block(table: pa.Table, threshold: float, num_perm: int) -> pa.Table:
    """Band rows of one hash partition -> verified edges ``src, dst``."""
    if not table.num_rows:
        return _EDGE_SCHEMA.empty_table()
    similarity = functools.partial(sketch_jaccard, num_perm=num_perm)
    return verified_edges(table[BAND].to_numpy(), table[ROW], table[SKETCH], threshold, similarity)


def exact_marks(edges: pa.Table, with_label: bool) -> pa.Table:
    """Exact copies as marks; their label comes from connected components unless ``with_label``."""
    label = edges["dst"] if with_label else pa.nulls(edges.num_rows, pa.string())
    return _marks(edges["src"], label, exact=True)


def near_marks(labels: pa.Table) -> pa.Table:
    """Nodes labelled by another row's key: each is a duplicate of that row."""
    labels = labels.filter(pc.not_equal(labels["node"], labels["label"]))
    return _marks(labels["node"], labels["label"], exact=False)


def _marks(rows: pa.ChunkedArray, labels: pa.ChunkedArray | pa.Array, exact: bool) -> pa.Table:
    return pa.table([rows, labels, pa.array([exact] * len(rows), pa.bool_())], schema=_MARK_SCHEMA)


def merge_marks(parts: Sequence[pa.Table]) -> pa.Table:
    """One row per marked row: its label (an exact copy has two marks when near dedup runs: the EXACT flag, and
    its group's label from components) and whether it is an exact copy."""
    parts = [part.select(_MARK_SCHEMA.names).cast(_MARK_SCHEMA) for part in parts if part.num_rows]
    marks = pa.concat_tables(parts) if parts else _MARK_SCHEMA.empty_table()
    merged = marks.group_by(ROW).aggregate([(LABEL, "max"), (EXACT, "any")])
    return merged.rename_columns([ROW, LABEL, EXACT])


def apply_marks(rows: pa.Table, marks: pa.Table) -> pa.Table:
    """Staged rows + the merged marks -> the rows, duplicates marked, ``dup_of`` set, temp columns gone."""
    started = time.perf_counter()
    where = pc.index_in(rows[ROW], value_set=marks[ROW])
    label = marks[LABEL].take(where)
    reason = pc.if_else(pc.fill_null(marks[EXACT].take(where), False), EXACT_REASON, NEAR_REASON)
    reason = pc.if_else(pc.is_valid(label), reason, pa.scalar(None, pa.string()))
    dup_of = pc.list_element(pc.split_pattern(label, _KEY_SEPARATOR, max_splits=1), 0)
    rows = rows.set_column(
        rows.schema.get_field_index("drop_reason"), "drop_reason", pc.coalesce(rows["drop_reason"], reason)
    )
    rows = rows.drop_columns([c for c in (ROW, HASH, SIG, DUP_OF) if c in rows.column_names])
    rows = rows.append_column(DUP_OF, dup_of.cast(pa.string()))
    return _charge_seconds(rows, time.perf_counter() - started)


_merged_marks: dict[tuple[str, ...], pa.Table] = {}  # per worker process: merge each run's marks once


class ApplyMarks:
    """`apply_marks` as a Ray Data batch function, given the marks' blocks as object references (a broadcast:
    marks are one small row per duplicate; each worker process fetches and merges them once)."""

    def __init__(self, mark_blocks: list[ray.ObjectRef]) -> None:
        self.mark_blocks = mark_blocks

    def __call__(self, rows: pa.Table) -> pa.Table:
        key = tuple(ref.hex() for ref in self.mark_blocks)
        marks = _merged_marks.get(key)
        if marks is None:
            _merged_marks.clear()
            marks = _merged_marks[key] = merge_marks(ray.get(self.mark_blocks))
        return apply_marks(rows, marks)


def marks_block(keys: pa.Table, spec: DedupSpec) -> tuple[pa.Table, int, bool]:
    """Key rows (row, hash, signature) held whole in one table -> the marks `DedupStep._marks` makes of them, in this
    process: the same per-block functions without the shuffles (each would be one partition) and connected
    components by `block_components`. Also returns the rounds components took and whether they settled."""
    keys = keys.filter(pc.is_valid(keys[HASH]))
    keys = exact_block(keys) if spec.exact else no_exact_block(keys)
    copies = keys.filter(pc.is_valid(keys[REP]))
    exact_edges = pa.table([copies[ROW], copies[REP]], schema=_EDGE_SCHEMA)
    if not spec.near:
        return exact_marks(exact_edges, with_label=True), 0, True
    representatives = keys.filter(pc.and_(pc.is_null(keys[REP]), pc.is_valid(keys[SIG])))
    near_edges = near_block(band_rows(representatives, spec.bands), spec.threshold, spec.num_perm)
    labels, rounds, converged = block_components(pa.concat_tables([exact_edges, near_edges]), spec.max_iterations)
    return pa.concat_tables([near_marks(labels), exact_marks(exact_edges, with_label=False)]), rounds, converged


@ray.remote(num_returns=3)
def _marks_task(paths: list[str], spec: DedupSpec) -> tuple[pa.Table, int, bool]:
    return marks_block(read_staged_files(pa.table({"path": paths}), [ROW, HASH, SIG]), spec)


def no_duplicates(table: pa.Table) -> pa.Table:
    return table.append_column(DUP_OF, pa.nulls(table.num_rows, pa.string()))


# ---------------------------------------------------------------- the step


def read_staged_files(batch: pa.Table, columns: list[str]) -> pa.Table:
    """The given columns of the staged Parquet files named in ``batch["path"]``."""
    return pa.concat_tables(pq.read_table(path, columns=columns) for path in batch["path"].to_pylist())


def read_staged(paths: list[str], columns: list[str]) -> Dataset:
    """Dedup's own staged files back as a Dataset, one read task per file.

    Not ``read_parquet``: its listing and footer-sampling operators run as tasks of their own, which on the 4x
    benchmark input are the largest processes at the peak (docs/benchmarks.md). These files are ours, their paths
    and schema known, so plain map tasks read them (and fuse with what follows)."""
    items = ray.data.from_items([{"path": path} for path in paths], override_num_blocks=len(paths))
    return items.map_batches(
        functools.partial(read_staged_files, columns=columns), batch_size=1, batch_format="pyarrow"
    )


def staged_column_bytes(paths: Sequence[str], columns: Sequence[str]) -> tuple[int, dict[str, int]]:
    """Rows, and the uncompressed bytes of each named column, of staged Parquet files, from their footers alone."""
    rows, sizes = 0, dict.fromkeys(columns, 0)
    for path in paths:
        metadata = pq.read_metadata(path)
        rows += metadata.num_rows
        for i in range(metadata.num_columns):
            name = metadata.schema.column(i).path.split(".", 1)[0]
            if name in sizes:
                sizes[name] += sum(
                    metadata.row_group(g).column(i).total_uncompressed_size for g in range(metadata.num_row_groups)
                )
    return rows, sizes


def bands_per_shuffle(bands: int, band_bytes: int, budget: int = BAND_SHUFFLE_BYTES) -> int:
    """How many LSH bands share one shuffle: as many as fit ``budget`` at ``band_bytes`` a band, at least one."""
    return max(1, min(bands, budget // max(band_bytes, 1)))


@dataclass(frozen=True)
class ShufflePlan:
    """How `DedupStep._marks` shuffles the key rows: hash partitions for the exact shuffle, LSH bands per band
    shuffle and hash partitions for each band shuffle.

    ``rows`` and ``column_bytes`` (of the key columns, staged) size them: one hash partition per `PARTITION_BYTES`
    unless ``dedup.num_partitions`` is set, and as many bands per shuffle as fit `BAND_SHUFFLE_BYTES`. A
    30k-conversation corpus then shuffles in one partition, not one per CPU: each partition is a reduce task (and,
    the first time, a worker start) however little it holds."""

    exact_partitions: int
    bands_per_shuffle: int
    band_partitions: int

    @classmethod
    def of(cls, spec: DedupSpec, rows: int, column_bytes: dict[str, int]) -> ShufflePlan:
        # A band row: the row key, an 8-byte bucket key and a half-byte per signature slot (plus Arrow's offsets).
        band_bytes = column_bytes[ROW] + rows * (8 + 4 + 4 + spec.num_perm // 2)
        group = bands_per_shuffle(spec.bands, band_bytes)
        return cls(
            exact_partitions=partitions_for(sum(column_bytes.values()), spec.num_partitions),
            bands_per_shuffle=group,
            band_partitions=partitions_for(group * band_bytes, spec.num_partitions),
        )

    def in_one_block(self, spec: DedupSpec) -> bool:
        """Every shuffle would be one partition and every band in one shuffle: the key rows fit one task."""
        near_whole = not spec.near or (self.bands_per_shuffle >= spec.bands and self.band_partitions == 1)
        return self.exact_partitions == 1 and near_whole


@dataclass(frozen=True)
class DedupStep:
    """Marks exact and near duplicates (see the module docstring); adds ``dup_of``. Row order is not kept.

    ``workdir``: where the rows are staged (the pipeline passes a directory under the run's output, which every node
    of a cluster must be able to read; the caller removes it after the dataset is consumed). None: a local temp dir.
    """

    spec: DedupSpec
    workdir: str | None = None

    def __call__(self, ds: Dataset) -> Dataset:
        spec = self.spec
        if not (spec.exact or spec.near):
            return ds.map_batches(no_duplicates, batch_format="pyarrow")
        staged = tempfile.mkdtemp(prefix="dedup-", dir=self.workdir)
        # The one pass over everything upstream (read, filters, pii, ...): the rows go to disk with their keys.
        ds.map_batches(KeyRows(spec), batch_format="pyarrow").write_parquet(staged, max_rows_per_file=STAGED_FILE_ROWS)
        files = sorted(name for name in os.listdir(staged) if name.endswith(".parquet"))
        if not files:
            return ds.map_batches(no_duplicates, batch_format="pyarrow")
        row_columns = [name for name in pq.read_schema(os.path.join(staged, files[0])).names if name not in (HASH, SIG)]
        paths = [os.path.join(staged, name) for name in files]
        plan = ShufflePlan.of(spec, *staged_column_bytes(paths, [ROW, HASH, SIG]))
        if plan.in_one_block(spec):
            # Each shuffle below would be one block and each pass one task: one task does them all, without a
            # Ray Data execution per shuffle (~0.1-0.2 s each, with the cores mostly idle; docs/benchmarks.md).
            marks_ref, rounds_ref, converged_ref = _marks_task.remote(paths, spec)
            rounds, converged = ray.get([rounds_ref, converged_ref])
            if spec.near:  # exact-only dedup runs no components
                report_rounds(rounds, converged, spec.max_iterations, "(dedup, in one task)")
            mark_blocks = [marks_ref]
        else:
            mark_blocks = block_refs(self._marks(read_staged(paths, [ROW, HASH, SIG]), spec, plan).materialize())
        return read_staged(paths, row_columns).map_batches(ApplyMarks(mark_blocks), batch_format="pyarrow")

    @staticmethod
    def _marks(keys: Dataset, spec: DedupSpec, plan: ShufflePlan) -> Dataset:
        """Key rows (row, hash, signature) -> marks (row, label, exact), one per duplicate (two for some)."""
        keys = keys.filter(expr=col(HASH).is_not_null())
        if spec.exact:
            keys = hash_partitioned(keys, HASH, plan.exact_partitions).map_batches(
                exact_block, batch_format="pyarrow", batch_size=None
            )
        else:
            keys = keys.map_batches(no_exact_block, batch_format="pyarrow")
        keys = keys.materialize()  # small (row key + signature); read by both the exact and the near branch
        exact_edges = (
            keys.filter(expr=col(REP).is_not_null()).select_columns([ROW, REP]).rename_columns({ROW: "src", REP: "dst"})
        )
        if not spec.near:
            return exact_edges.map_batches(functools.partial(exact_marks, with_label=True), batch_format="pyarrow")
        group = plan.bands_per_shuffle
        representatives = keys.filter(expr=col(REP).is_null() & col(SIG).is_not_null())
        near_edges = []
        for first in range(0, spec.bands, group):
            band_fn = functools.partial(band_rows, bands=spec.bands, first=first, last=first + group)
            verify = functools.partial(near_block, threshold=spec.threshold, num_perm=spec.num_perm)
            bands = representatives.map_batches(band_fn, batch_format="pyarrow")
            near_edges.append(
                hash_partitioned(bands, BAND, plan.band_partitions)
                .map_batches(verify, batch_format="pyarrow", batch_size=None)
                .materialize()
            )
        components = connected_components(exact_edges.union(*near_edges), spec.num_partitions, spec.max_iterations)
        return components.labels.map_batches(near_marks, batch_format="pyarrow").union(
            exact_edges.map_batches(functools.partial(exact_marks, with_label=False), batch_format="pyarrow")
        )
