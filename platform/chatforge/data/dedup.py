"""Deduplication: keeps one row of each group of exact or near copies and marks the others as duplicates.

Only kept rows (``drop_reason`` null) take part, and nothing is removed: a duplicate gets ``drop_reason``
"duplicate:exact" or "duplicate:near" (an earlier reason stays) and ``dup_of``, the id of the row its group keeps,
which is the group's smallest id.

Exact copies have the same normalized conversation (roles and contents NFKC-normalized, lower-cased and
whitespace-collapsed, one turn a line) and so the same 128-bit hash of it.

Near copies are found by MinHash LSH. A conversation's shingles are its runs of ``shingle_words`` words, and the
similarity of two conversations is the Jaccard index of their shingle sets. Its MinHash signature holds, for each of
``num_perm`` hash functions, the smallest hash of any of its shingles: two signatures agree in a slot with
probability equal to that Jaccard index, so the fraction of equal slots estimates it. Locality-sensitive hashing cuts
each signature into ``bands`` bands of ``num_perm / bands`` slots and hashes each band to a bucket key. Rows sharing
a bucket in any band are candidate pairs; a candidate whose estimated Jaccard reaches ``threshold`` is a near copy
(estimated from a 4-bit sketch of each signature, which is what the shuffled band rows carry: `sketch_jaccard`).
The copies, exact and near, are the edges of a graph whose connected components are the groups. So a chain in which
a is near b and b near c, but a not near c, is still one group.

A worked example with ids a < b < c < d:

    a  "How do I sort a list?" and a long answer    kept: the group's smallest id
    b  "how do I  SORT a list?" and the same answer  duplicate:exact, dup_of a (same normalized text)
    c  a with one word of its answer changed       duplicate:near, dup_of a (near a)
    d  c with one more word changed                duplicate:near, dup_of a (near c, not a: a's group via c)

The step works with these tables; their ``_dedup_*`` columns are temporary, all removed before the step returns:

- staged rows: the full rows plus their key columns, written once to Parquet;
- key rows: ``ROW_KEY``, ``EXACT_HASH``, ``SIGNATURE``, read back from the staged files for the global work;
- band rows: one per key row and LSH band: ``BUCKET``, ``ROW_KEY``, ``SKETCH`` (see `signature_sketch`);
- edges: ``src, dst``: row keys of one group, ``dst`` the smaller (the input of connected components);
- verdicts: one per duplicate: ``ROW_KEY``, ``KEPT_ROW_KEY`` (the row its group keeps), ``IS_EXACT_COPY``.

Dedup needs every row before it can mark any, yet the rows must stream. So the rows go to disk once, and only their
key rows take part in the global work: hash-partitioned shuffles and per-block passes in Ray Data, with no
driver-side set of hashes or edges and no per-group Python ``map_groups``.

1. One streaming pass adds the key columns (`AddKeyColumns`, the vectorised hot loop) and writes the staged rows.
2. The key rows are read back and hash-partitioned by exact hash. In each block every row gets ``EXACT_COPY_OF``, the
   smallest row key with its hash (`with_exact_copy_of`); a row with none is the one its hash group keeps.
3. The rows their hash group keeps become band rows (`band_rows`), hash-partitioned by bucket, as many bands per
   shuffle as fit a fixed byte budget. Each block verifies the pairs that share a bucket (`verified_band_edges`).
4. Connected components over exact and near edges (`chatforge.data.components`) label each row with its group's
   smallest row key; the labels become verdicts.
5. The verdicts, one small row per duplicate, are broadcast by object reference, and the staged rows stream back
   from disk through a per-block pass that applies them (`ApplyVerdicts`): full rows are never shuffled nor held in
   memory.

When every shuffle of steps 2-4 would be one partition (`ShufflePlan.fits_one_task`), one Ray task runs them on the
key rows with the same per-block functions (`verdicts_in_one_table`): each shuffle would be one block in one task
anyway, and a Ray Data execution per shuffle costs more than the work (docs/curation.md).

Every function above `DedupStep` is pure (no Ray) and unit-tested.
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

from chatforge.compat import block_refs
from chatforge.config import DedupSpec
from chatforge.data.components import (
    PARTITION_BYTES,
    block_components,
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

# Key columns, added to every row by the staging pass.
# A row key is "<id>\0<meta hash>\0<batch>.<n>": unique even when two rows share an id (ids fall back to a content
# hash, so identical records from one source do), and its string order is the id order, so "smallest row key" means
# "smallest id".
ROW_KEY = "_dedup_row_key"
# Hash of the normalized conversation; null for a row that takes no part (dropped already, or without messages).
EXACT_HASH = "_dedup_exact_hash"
# MinHash signature (only when near dedup runs). A row without an exact hash gets zeros, not null: Parquet readers
# before pyarrow 26 cannot read a null fixed-size list back (apache/arrow#35692). Every reader skips such rows first.
SIGNATURE = "_dedup_signature"
# Key rows after the exact pass: the smallest row key with the same exact hash, null for that row itself.
EXACT_COPY_OF = "_dedup_exact_copy_of"
# Band rows: the LSH bucket key of one band of a signature, and the signature's sketch.
BUCKET, SKETCH = "_dedup_bucket", "_dedup_sketch"
# Verdicts (with ROW_KEY): the row key of the row the duplicate's group keeps, and whether it is an exact copy.
KEPT_ROW_KEY, IS_EXACT_COPY = "_dedup_kept_row_key", "_dedup_is_exact_copy"

_KEY_SEPARATOR = "\x00"
_EDGE_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string())])
_VERDICT_SCHEMA = pa.schema([(ROW_KEY, pa.string()), (KEPT_ROW_KEY, pa.string()), (IS_EXACT_COPY, pa.bool_())])

_MAX_HASH = np.uint32(0xFFFFFFFF)
_SHINGLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: shingle hash = polynomial in word hashes
_BAND_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-1a's prime, to mix the values of a band into one key
_SHINGLES_PER_CHUNK = 1 << 16  # bounds the (num_perm x shingles) matrix of one chunk to num_perm * 256 KiB
# The band rows are the largest thing dedup moves; bands go through the shuffle in groups of about this many bytes,
# each group's edges materialized before the next (see DedupStep._verdicts_by_shuffles). One partition's worth: a
# group then needs no keyed shuffle until a single band outgrows a partition. Larger groups put several partitions'
# worth of bands through one keyed shuffle, whose map task and worker pool then make most of a large run's peak
# memory (docs/benchmarks.md).
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


def _short_hash(text: str) -> str:
    return xxhash.xxh64_hexdigest(text.encode("utf-8"))


def text_hash(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def exact_key(messages: Sequence[dict[str, str]]) -> str:
    """The exact-duplicate key of a conversation."""
    return text_hash(normalized_conversation(messages))


# ---------------------------------------------------------------- MinHash signatures, LSH buckets and sketches


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

    Imported here, not at the top: datasketch's package imports its LSH classes and with them scipy, which every
    worker that unpickles a dedup function would pay, though only the signature pass needs this."""
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
    batch at once with numpy, faster than datasketch's ``MinHash.bulk`` on the same hashes (docs/benchmarks.md).
    A text without words gets the all-max signature; callers keep such texts out of the near stage.
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


def signature_sketch(signatures: np.ndarray) -> np.ndarray:
    """The low 4 bits of every slot, two slots a byte: an eighth of the signature's bytes, which is what the band
    rows (one per band per row) carry for verification. See `sketch_jaccard`."""
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


def bucket_keys(signatures: np.ndarray, bands: int, first: int = 0, last: int | None = None) -> np.ndarray:
    """``(n, last - first)`` int64 LSH bucket keys of bands ``first:last`` (all by default): a hash of the band's
    index and its ``num_perm / bands`` slots. Only those bands' slots are read.

    Two texts share a bucket in some band with probability 1 - (1 - J^slots_per_band)^bands for Jaccard J.
    """
    n, num_perm = signatures.shape
    last = bands if last is None else min(last, bands)
    slots_per_band = num_perm // bands
    banded = signatures[:, first * slots_per_band : last * slots_per_band]
    banded = banded.reshape(n, last - first, slots_per_band).astype(np.uint64)
    indices = np.arange(first + 1, last + 1, dtype=np.uint64)
    keys = np.broadcast_to(indices * _SHINGLE_MULTIPLIER, (n, last - first))
    for value in np.moveaxis(banded, 2, 0):
        keys = (keys ^ value) * _BAND_MULTIPLIER
    return (keys ^ (keys >> np.uint64(29))).view(np.int64)


# ---------------------------------------------------------------- pairs within one block: exact copies, near edges


def smallest_row_sharing_key(keys: Sequence[str] | pa.Array, rows: Sequence[str] | pa.Array) -> pa.Array:
    """For each row, the smallest row with the same key, or null when it is that row (the one to keep)."""
    table = pa.table({"key": keys, "row": rows})
    smallest = table.group_by("key").aggregate([("row", "min")])
    kept = smallest["row_min"].take(pc.index_in(table["key"], value_set=smallest["key"]))
    is_itself = pc.equal(kept, table["row"]).combine_chunks()
    return pc.if_else(is_itself, pa.scalar(None, pa.string()), kept.combine_chunks())


def distinct_row_keys(row_keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """The distinct row keys in sorted order, each row's index into them, and each distinct key's first row.

    Arrow's dictionary encoding, not Python strings: a band shuffle's partition holds ~0.5M band rows, whose keys
    as Python objects would take twice the memory of the Arrow column they come from."""
    if isinstance(row_keys, pa.ChunkedArray):
        row_keys = row_keys.combine_chunks()
    elif not isinstance(row_keys, pa.Array):
        row_keys = pa.array(row_keys, pa.string())
    encoded = pc.dictionary_encode(row_keys)
    order = pc.array_sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    node_of = rank[encoded.indices.to_numpy()]
    _, first = np.unique(node_of, return_index=True)  # every node occurs, so this is indexed by node
    return encoded.dictionary.take(pa.array(order)), node_of, first


def verified_edges(
    buckets: np.ndarray,
    row_keys: Sequence[str] | pa.Array | pa.ChunkedArray,
    signatures: np.ndarray | pa.Array | pa.ChunkedArray,
    threshold: float,
    similarity=estimated_jaccard,
) -> pa.Table:
    """Near-copy edges ``src, dst`` among one block of band rows (``buckets[i]`` is row i's bucket in one band).

    Rows sharing a bucket are candidate pairs, kept when their estimated Jaccard reaches ``threshold``. Kept
    pairs are merged within this block (union-find over the block only) and each row is linked to the smallest row
    of its local group: fewer edges, and shallow components for the global connected-components rounds.
    ``signatures`` may be a fixed-size list column: only each distinct row's first one is then made a matrix (a row
    repeats in every band of the block, with the same sketch).
    """
    names, node_of, first = distinct_row_keys(row_keys)
    if isinstance(signatures, np.ndarray):
        node_signatures = signatures[first]
    else:
        node_signatures = _signature_matrix(signatures.take(pa.array(first)))
    order = np.argsort(buckets, kind="stable")
    sorted_buckets, sorted_nodes = buckets[order], node_of[order]
    starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]])
    sizes = np.diff(np.r_[starts, len(buckets)])
    # Pair every row with each later row of its bucket, one offset at a time: vectorised, and the loop runs only
    # as many times as the largest bucket is long.
    later_in_bucket = np.repeat(starts + sizes, sizes) - np.arange(len(buckets)) - 1
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


def _signature_column(signatures: np.ndarray, present: np.ndarray) -> pa.FixedSizeListArray:
    """Signatures (one row per True in ``present``) as a fixed-size list column, zeros elsewhere (see SIGNATURE)."""
    full = np.zeros((len(present), signatures.shape[1]), dtype=np.uint32)
    full[present] = signatures
    return pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), signatures.shape[1])


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


def key_columns(spec: DedupSpec) -> list[str]:
    """The key rows' columns: the signature only when near dedup runs."""
    return [ROW_KEY, EXACT_HASH, SIGNATURE] if spec.near else [ROW_KEY, EXACT_HASH]


@dataclass(frozen=True)
class AddKeyColumns:
    """Adds ``ROW_KEY`` to every row, and for kept rows ``EXACT_HASH`` and (if ``near``) ``SIGNATURE``."""

    spec: DedupSpec

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        ids = [i or "" for i in table["id"].to_pylist()]
        metas = table["meta"].to_pylist() if "meta" in table.column_names else [None] * len(ids)
        batch = _short_hash("\n".join(ids))  # tells apart rows whose id and meta are both equal
        row_keys = [
            _KEY_SEPARATOR.join((i, _short_hash(m or ""), f"{batch}.{n}"))
            for n, (i, m) in enumerate(zip(ids, metas, strict=True))
        ]
        kept = pc.is_null(table["drop_reason"]).to_pylist()
        texts = [
            normalized_conversation(messages) if is_kept and messages else None
            for is_kept, messages in zip(kept, table["messages"].to_pylist(), strict=True)
        ]
        table = table.append_column(ROW_KEY, pa.array(row_keys, pa.string()))
        hashes = [text_hash(t) if t is not None else None for t in texts]
        table = table.append_column(EXACT_HASH, pa.array(hashes, pa.string()))
        if self.spec.near:
            present = np.array([text is not None for text in texts], dtype=bool)
            signatures = minhash_signatures(
                [t for t in texts if t is not None], self.spec.num_perm, self.spec.shingle_words
            )
            table = table.append_column(SIGNATURE, _signature_column(signatures, present))
        return _charge_seconds(table, time.perf_counter() - started)


def with_exact_copy_of(key_rows: pa.Table, find_copies: bool = True) -> pa.Table:
    """Key rows (of one hash partition of ``EXACT_HASH``) with ``EXACT_COPY_OF``: the smallest row key with the
    same exact hash, null for that row. Without ``find_copies`` (exact dedup off) it is null for every row."""
    if find_copies:
        copy_of = smallest_row_sharing_key(key_rows[EXACT_HASH], key_rows[ROW_KEY])
    else:
        copy_of = pa.nulls(key_rows.num_rows, pa.string())
    return key_rows.drop_columns([EXACT_HASH]).append_column(EXACT_COPY_OF, copy_of)


def band_rows(key_rows: pa.Table, bands: int, first: int = 0, last: int | None = None) -> pa.Table:
    """One row per (key row, band in ``first:last``): the band's ``BUCKET``, ``ROW_KEY``, and the ``SKETCH``."""
    signatures = _signature_matrix(key_rows[SIGNATURE])
    buckets = bucket_keys(signatures, bands, first, last)
    repeated = np.repeat(signature_sketch(signatures), buckets.shape[1], axis=0)
    return pa.table(
        {
            BUCKET: pa.array(buckets.ravel(), pa.int64()),
            ROW_KEY: key_rows[ROW_KEY].take(np.repeat(np.arange(key_rows.num_rows), buckets.shape[1])),
            SKETCH: pa.FixedSizeListArray.from_arrays(pa.array(repeated.ravel()), repeated.shape[1]),
        }
    )


def verified_band_edges(partition: pa.Table, threshold: float, num_perm: int) -> pa.Table:
    """The band rows of one hash partition of ``BUCKET`` -> their verified near-copy edges ``src, dst``."""
    if not partition.num_rows:
        return _EDGE_SCHEMA.empty_table()
    similarity = functools.partial(sketch_jaccard, num_perm=num_perm)
    return verified_edges(partition[BUCKET].to_numpy(), partition[ROW_KEY], partition[SKETCH], threshold, similarity)


def exact_copy_edges(key_rows: pa.Table) -> pa.Table:
    """Key rows with ``EXACT_COPY_OF`` -> an edge ``src, dst`` from each exact copy to the row its hash keeps."""
    copies = key_rows.filter(pc.is_valid(key_rows[EXACT_COPY_OF]))
    return pa.table([copies[ROW_KEY], copies[EXACT_COPY_OF]], schema=_EDGE_SCHEMA)


# ---------------------------------------------------------------- verdicts: one row per duplicate


def exact_copy_verdicts(exact_edges: pa.Table, kept_row_from_edges: bool) -> pa.Table:
    """Exact-copy edges as verdicts. With ``kept_row_from_edges`` (exact dedup alone) each edge's ``dst`` is the
    row kept; otherwise ``KEPT_ROW_KEY`` is null and `group_verdicts` supplies it."""
    kept = exact_edges["dst"] if kept_row_from_edges else pa.nulls(exact_edges.num_rows, pa.string())
    return _verdict_table(exact_edges["src"], kept, is_exact_copy=True)


def group_verdicts(labels: pa.Table) -> pa.Table:
    """Connected-components labels (``node, label``) -> a verdict for every node labelled with another row's key:
    it is a duplicate of that row, its group's smallest. Exact copies are among them, flagged by their own verdict."""
    labels = labels.filter(pc.not_equal(labels["node"], labels["label"]))
    return _verdict_table(labels["node"], labels["label"], is_exact_copy=False)


def _verdict_table(
    row_keys: pa.ChunkedArray, kept_row_keys: pa.ChunkedArray | pa.Array, is_exact_copy: bool
) -> pa.Table:
    flags = pa.array([is_exact_copy] * len(row_keys), pa.bool_())
    return pa.table([row_keys, kept_row_keys, flags], schema=_VERDICT_SCHEMA)


def merged_verdicts(parts: Sequence[pa.Table]) -> pa.Table:
    """One verdict per duplicate: an exact copy has two when near dedup runs (the exact-copy flag, and its group's
    kept row), which merge into one."""
    parts = [part.select(_VERDICT_SCHEMA.names).cast(_VERDICT_SCHEMA) for part in parts if part.num_rows]
    verdicts = pa.concat_tables(parts) if parts else _VERDICT_SCHEMA.empty_table()
    merged = verdicts.group_by(ROW_KEY).aggregate([(KEPT_ROW_KEY, "max"), (IS_EXACT_COPY, "any")])
    return merged.rename_columns([ROW_KEY, KEPT_ROW_KEY, IS_EXACT_COPY])


def rows_with_verdicts(rows: pa.Table, verdicts: pa.Table) -> pa.Table:
    """Staged rows with the merged verdicts applied: ``drop_reason`` and ``dup_of`` set, the key columns gone."""
    started = time.perf_counter()
    where = pc.index_in(rows[ROW_KEY], value_set=verdicts[ROW_KEY])
    kept_row_key = verdicts[KEPT_ROW_KEY].take(where)
    reason = pc.if_else(pc.fill_null(verdicts[IS_EXACT_COPY].take(where), False), EXACT_REASON, NEAR_REASON)
    reason = pc.if_else(pc.is_valid(kept_row_key), reason, pa.scalar(None, pa.string()))
    dup_of = pc.list_element(pc.split_pattern(kept_row_key, _KEY_SEPARATOR, max_splits=1), 0)
    rows = rows.set_column(
        rows.schema.get_field_index("drop_reason"), "drop_reason", pc.coalesce(rows["drop_reason"], reason)
    )
    rows = rows.drop_columns([c for c in (ROW_KEY, EXACT_HASH, SIGNATURE, DUP_OF) if c in rows.column_names])
    rows = rows.append_column(DUP_OF, dup_of.cast(pa.string()))
    return _charge_seconds(rows, time.perf_counter() - started)


_merged_verdicts_cache: dict[tuple[str, ...], pa.Table] = {}  # per worker process: merge each run's verdicts once


class ApplyVerdicts:
    """`rows_with_verdicts` as a Ray Data batch function, given the verdicts' blocks as object references (a
    broadcast: verdicts are one small row per duplicate; each worker process fetches and merges them once)."""

    def __init__(self, verdict_refs: list[ray.ObjectRef]) -> None:
        self.verdict_refs = verdict_refs

    def __call__(self, rows: pa.Table) -> pa.Table:
        key = tuple(ref.hex() for ref in self.verdict_refs)
        verdicts = _merged_verdicts_cache.get(key)
        if verdicts is None:
            _merged_verdicts_cache.clear()
            verdicts = _merged_verdicts_cache[key] = merged_verdicts(ray.get(self.verdict_refs))
        return rows_with_verdicts(rows, verdicts)


def verdicts_in_one_table(key_rows: pa.Table, spec: DedupSpec) -> tuple[pa.Table, int, bool]:
    """Key rows held whole in one table -> the verdicts `DedupStep._verdicts_by_shuffles` makes of them, in this
    process: the same per-block functions without the shuffles (each would be one partition) and connected
    components by `block_components`. Also returns the rounds components took and whether they settled."""
    key_rows = with_exact_copy_of(key_rows.filter(pc.is_valid(key_rows[EXACT_HASH])), find_copies=spec.exact)
    exact_edges = exact_copy_edges(key_rows)
    if not spec.near:
        return exact_copy_verdicts(exact_edges, kept_row_from_edges=True), 0, True
    kept_by_hash = key_rows.filter(pc.is_null(key_rows[EXACT_COPY_OF]))
    near_edges = verified_band_edges(band_rows(kept_by_hash, spec.bands), spec.threshold, spec.num_perm)
    labels, rounds, converged = block_components(pa.concat_tables([exact_edges, near_edges]), spec.max_iterations)
    verdicts = [group_verdicts(labels), exact_copy_verdicts(exact_edges, kept_row_from_edges=False)]
    return pa.concat_tables(verdicts), rounds, converged


@ray.remote(num_returns=3)
def _verdicts_task(paths: list[str], spec: DedupSpec) -> tuple[pa.Table, int, bool]:
    return verdicts_in_one_table(read_staged_files(pa.table({"path": paths}), key_columns(spec)), spec)


def with_null_dup_of(table: pa.Table) -> pa.Table:
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
    """How `DedupStep._verdicts_by_shuffles` shuffles the key rows: hash partitions for the exact shuffle, LSH bands
    per band shuffle and hash partitions for each band shuffle.

    ``rows`` and ``column_bytes`` (of the key columns, staged) size them: one hash partition per `PARTITION_BYTES`
    unless ``dedup.num_partitions`` is set, and as many bands per shuffle as fit `BAND_SHUFFLE_BYTES`. A small
    corpus then shuffles in one partition, not one per CPU: each partition is a reduce task (and, the first time, a
    worker start) however little it holds."""

    exact_partitions: int
    bands_per_shuffle: int
    band_partitions: int

    @classmethod
    def of(cls, spec: DedupSpec, rows: int, column_bytes: dict[str, int]) -> ShufflePlan:
        # A band row: the row key, an 8-byte bucket key and a half-byte per signature slot (plus Arrow's offsets).
        band_bytes = column_bytes[ROW_KEY] + rows * (8 + 4 + 4 + spec.num_perm // 2)
        group = bands_per_shuffle(spec.bands, band_bytes)
        return cls(
            exact_partitions=partitions_for(sum(column_bytes.values()), spec.num_partitions),
            bands_per_shuffle=group,
            band_partitions=partitions_for(group * band_bytes, spec.num_partitions),
        )

    def fits_one_task(self, spec: DedupSpec) -> bool:
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
            return ds.map_batches(with_null_dup_of, batch_format="pyarrow")
        staged = tempfile.mkdtemp(prefix="dedup-", dir=self.workdir)
        # The one pass over everything upstream (read, filters, pii, ...): the rows go to disk with their keys.
        ds.map_batches(AddKeyColumns(spec), batch_format="pyarrow").write_parquet(
            staged, max_rows_per_file=STAGED_FILE_ROWS
        )
        files = sorted(name for name in os.listdir(staged) if name.endswith(".parquet"))
        if not files:
            return ds.map_batches(with_null_dup_of, batch_format="pyarrow")
        paths = [os.path.join(staged, name) for name in files]
        keys = key_columns(spec)
        row_columns = [name for name in pq.read_schema(paths[0]).names if name not in (EXACT_HASH, SIGNATURE)]
        plan = ShufflePlan.of(spec, *staged_column_bytes(paths, keys))
        if plan.fits_one_task(spec):
            verdicts_ref, rounds_ref, converged_ref = _verdicts_task.remote(paths, spec)
            rounds, converged = ray.get([rounds_ref, converged_ref])
            if spec.near:  # exact-only dedup runs no components
                report_rounds(rounds, converged, spec.max_iterations, "(dedup, in one task)")
            verdict_refs = [verdicts_ref]
        else:
            verdicts = self._verdicts_by_shuffles(read_staged(paths, keys), spec, plan)
            verdict_refs = block_refs(verdicts.materialize())
        return read_staged(paths, row_columns).map_batches(ApplyVerdicts(verdict_refs), batch_format="pyarrow")

    @staticmethod
    def _verdicts_by_shuffles(key_rows: Dataset, spec: DedupSpec, plan: ShufflePlan) -> Dataset:
        """Key rows -> verdicts, one per duplicate (two for an exact copy when near dedup runs), through Ray Data's
        shuffles: the distributed form of `verdicts_in_one_table`."""
        key_rows = key_rows.filter(expr=col(EXACT_HASH).is_not_null())
        if spec.exact:
            key_rows = hash_partitioned(key_rows, EXACT_HASH, plan.exact_partitions).map_batches(
                with_exact_copy_of, batch_format="pyarrow", batch_size=None
            )
        else:
            key_rows = key_rows.map_batches(
                functools.partial(with_exact_copy_of, find_copies=False), batch_format="pyarrow"
            )
        key_rows = key_rows.materialize()  # small (row key + signature); read by both the exact and the near branch
        exact_edges = key_rows.map_batches(exact_copy_edges, batch_format="pyarrow")
        if not spec.near:
            exact_verdicts = functools.partial(exact_copy_verdicts, kept_row_from_edges=True)
            return exact_edges.map_batches(exact_verdicts, batch_format="pyarrow")
        group = plan.bands_per_shuffle
        kept_by_hash = key_rows.filter(expr=col(EXACT_COPY_OF).is_null())
        near_edges = []
        for first in range(0, spec.bands, group):
            to_band_rows = functools.partial(band_rows, bands=spec.bands, first=first, last=first + group)
            verify = functools.partial(verified_band_edges, threshold=spec.threshold, num_perm=spec.num_perm)
            bands = kept_by_hash.map_batches(to_band_rows, batch_format="pyarrow")
            near_edges.append(
                hash_partitioned(bands, BUCKET, plan.band_partitions)
                .map_batches(verify, batch_format="pyarrow", batch_size=None)
                .materialize()
            )
        components = connected_components(exact_edges.union(*near_edges), spec.num_partitions, spec.max_iterations)
        exact_verdicts = functools.partial(exact_copy_verdicts, kept_row_from_edges=False)
        return components.labels.map_batches(group_verdicts, batch_format="pyarrow").union(
            exact_edges.map_batches(exact_verdicts, batch_format="pyarrow")
        )
