"""Dedup's pure pieces: normalization, shingles, MinHash, LSH buckets, pairs within a block, verdicts, one CC round."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHash

from chatforge.config import DedupSpec
from chatforge.data import components
from chatforge.data.dedup import (
    DUP_OF,
    EXACT_HASH,
    IS_EXACT_COPY,
    KEPT_ROW_KEY,
    ROW_KEY,
    SIGNATURE,
    AddKeyColumns,
    ShufflePlan,
    bands_per_shuffle,
    bucket_keys,
    distinct_row_keys,
    estimated_jaccard,
    exact_key,
    key_columns,
    merged_verdicts,
    minhash_signatures,
    normalize_text,
    read_staged_files,
    rows_with_verdicts,
    shingle_hashes,
    signature_sketch,
    sketch_jaccard,
    smallest_row_sharing_key,
    staged_column_bytes,
    verdicts_in_one_table,
    verified_edges,
)
from chatforge.data.schema import BASE_SCHEMA, STAGE_SECONDS_COLUMN

WORDS = [f"w{i}x{chr(97 + i % 26)}" for i in range(500)]


def random_text(seed: int, n_words: int = 100) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def change_word(text: str, position: int, word: str = "changed") -> str:
    words = text.split()
    words[position] = word
    return " ".join(words)


def true_jaccard(a: str, b: str, k: int) -> float:
    def shingles(text: str) -> set[tuple[str, ...]]:
        words = text.split()
        return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def conversation(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------- normalization and the exact key


def test_whitespace_case_and_unicode_variants_share_the_exact_key():
    base = conversation("Hello there, how are you?", "Fine, thanks.")
    variants = [
        conversation("  hello   THERE,\thow are\nyou? ", "FINE,  thanks."),
        conversation("Ｈｅｌｌｏ there, how are you?", "Fine,\u00a0thanks."),  # full-width letters, NBSP (NFKC)
        [{"role": "USER", "content": "Hello there, how are you?"}, {"role": "assistant", "content": "Fine, thanks."}],
    ]
    assert {exact_key(v) for v in variants} == {exact_key(base)}
    assert exact_key(conversation("Hello there, how are you?", "Fine, thanks!")) != exact_key(base)
    # the turn split is part of the key: the same words in other turns are another conversation
    assert exact_key(conversation("Hello there, how are you? Fine,", "thanks.")) != exact_key(base)
    assert normalize_text("  A\u3000B\n\nc ") == "a b c"


# ---------------------------------------------------------------- shingles and signatures


def test_shingles_stay_inside_each_text():
    texts = ["a b c d e f g", "x y", "", "   ", "p q r s t"]
    hashes, offsets = shingle_hashes(texts, 5)
    assert np.diff(offsets).tolist() == [3, 1, 0, 0, 1]
    for i, text in enumerate(texts):  # batching changes nothing: no window reaches into the next text
        alone, _ = shingle_hashes([text], 5)
        assert hashes[offsets[i] : offsets[i + 1]].tolist() == alone.tolist()
    assert shingle_hashes(["b c d e f"], 5)[0].tolist() == [hashes[1]]  # the 2nd window of text 0
    assert shingle_hashes(["a b c d f"], 5)[0].tolist() != [hashes[0]]


def test_signatures_match_datasketch_minhash():
    texts = [random_text(seed, n) for seed, n in [(1, 80), (2, 3), (3, 150)]]
    hashes, offsets = shingle_hashes(texts, 5)
    signatures = minhash_signatures(texts, num_perm=64, shingle_words=5)
    for i in range(len(texts)):
        reference = MinHash(num_perm=64, seed=1, hashfunc=lambda h: h)
        reference.update_batch(hashes[offsets[i] : offsets[i + 1]])
        assert np.array_equal(signatures[i], reference.hashvalues)


def test_signature_similarity_tracks_true_jaccard():
    original = random_text(7, 120)
    one_word = change_word(original, 60)
    many_words = " ".join(f"new{p}" if p % 20 == 10 else w for p, w in enumerate(original.split()))  # J ~0.6
    unrelated = random_text(8, 120)
    signatures = minhash_signatures([original, original, one_word, many_words, unrelated], 256, 5)

    assert np.array_equal(signatures[0], signatures[1])
    for index, other in [(2, one_word), (3, many_words)]:
        expected = true_jaccard(original, other, 5)
        assert abs(estimated_jaccard(signatures[0], signatures[index]) - expected) < 0.08, expected
    assert true_jaccard(original, one_word, 5) > 0.9
    assert estimated_jaccard(signatures[0], signatures[4]) < 0.05


def test_near_copies_share_a_bucket_and_unrelated_texts_do_not():
    originals = [random_text(seed, 100) for seed in range(40)]
    copies = [change_word(text, 50) for text in originals]
    keys = bucket_keys(minhash_signatures(originals + copies, 128, 5), bands=16)
    assert keys.shape == (80, 16) and keys.dtype == np.int64
    shared = [bool(np.any(keys[i] == keys[40 + i])) for i in range(40)]
    assert sum(shared) >= 38  # P(miss) = (1 - 0.9^8)^16 ~ 1e-6 per pair at Jaccard 0.9
    all_keys = keys[:40].ravel()
    assert len(np.unique(all_keys)) == len(all_keys)  # unrelated originals: no bucket in common


def test_band_index_is_part_of_the_key():
    signatures = np.ones((1, 16), dtype=np.uint32)  # every band holds the same values
    keys = bucket_keys(signatures, bands=4)
    assert len(set(keys[0].tolist())) == 4


def test_a_range_of_bands_has_the_keys_those_bands_have_in_the_whole():
    signatures = minhash_signatures([random_text(seed, 80) for seed in range(5)], 128, 5)
    whole = bucket_keys(signatures, bands=16)
    for first, last in ((0, 4), (4, 8), (12, 16), (5, 6), (10, 99)):
        assert np.array_equal(bucket_keys(signatures, 16, first, last), whole[:, first:last]), (first, last)


# ---------------------------------------------------------------- pairs within one block


def test_each_row_points_at_the_smallest_row_sharing_its_key():
    keys = ["h1", "h2", "h1", "h1", "h3", "h2"]
    rows = ["c", "b", "a", "d", "e", "z"]
    assert smallest_row_sharing_key(keys, rows).to_pylist() == ["a", None, None, "a", None, "b"]


def test_verified_edges_link_near_copies_to_the_smallest_row_and_reject_false_candidates():
    base = minhash_signatures([random_text(1, 100)], 128, 5)[0]
    near = base.copy()
    near[:10] += 1  # estimated Jaccard ~0.92
    far = base.copy()
    far[:64] += 1  # ~0.5: shares a bucket, fails verification
    rows = ["r3", "r1", "r2", "r1", "r9", "r9b"]
    keys = np.array([5, 5, 7, 7, 5, 8])
    signatures = np.stack([near, base, near, base, far, far])
    edges = verified_edges(keys, rows, signatures, threshold=0.8)
    assert edge_list(edges) == [("r2", "r1"), ("r3", "r1")]
    assert edge_list(verified_edges(keys, pa.chunked_array([rows[:2], rows[2:]]), signatures, threshold=0.8)) == [
        ("r2", "r1"),
        ("r3", "r1"),
    ]
    as_column = pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel()), signatures.shape[1])
    assert edge_list(verified_edges(keys, rows, as_column, threshold=0.8)) == [("r2", "r1"), ("r3", "r1")]
    assert verified_edges(np.array([1, 2]), ["a", "b"], signatures[:2], threshold=0.8).num_rows == 0  # no candidates


def test_verified_edges_merge_a_chain_inside_the_block():
    a = np.arange(100, dtype=np.uint32)
    b, c = a.copy(), a.copy()
    b[:20] += 1000
    c[:40] += 1000  # a~b and b~c at 0.75 threshold (0.8), a!~c (0.6)
    edges = verified_edges(np.array([1, 1, 1]), ["a", "b", "c"], np.stack([a, b, c]), threshold=0.75)
    assert edge_list(edges) == [("b", "a"), ("c", "a")]


def edge_list(edges: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(edges["src"].to_pylist(), edges["dst"].to_pylist(), strict=True))


def test_distinct_row_keys_are_numbered_in_sorted_order():
    names, node_of, first = distinct_row_keys(pa.chunked_array([["c", "a"], ["b", "a", "c", "d"]]))
    assert names.to_pylist() == ["a", "b", "c", "d"]
    assert node_of.tolist() == [2, 0, 1, 0, 2, 3]
    assert first.tolist() == [1, 2, 0, 5]


def test_key_rows_skip_dropped_rows_and_charge_stage_seconds():
    records = [
        {"id": "s:1", "source": "s", "messages": conversation("hi there", "hello"), "meta": "{}", "raw": None},
        {"id": "s:2", "source": "s", "messages": None, "meta": "{}", "raw": "{bad", "drop_reason": "malformed:json"},
        {"id": "s:3", "source": "s", "messages": conversation("hi there", "hello"), "drop_reason": "filters:short"},
    ]
    table = pa.Table.from_pylist(records, schema=BASE_SCHEMA)
    keyed = AddKeyColumns(DedupSpec(num_perm=32, bands=8))(table)
    assert keyed[EXACT_HASH].to_pylist()[1:] == [None, None]
    assert keyed[EXACT_HASH][0].as_py() == exact_key(records[0]["messages"])
    assert len(keyed[SIGNATURE][0].as_py()) == 32
    assert keyed[ROW_KEY][0].as_py().startswith("s:1\x00")
    assert len(set(keyed[ROW_KEY].to_pylist())) == 3
    assert dict(keyed[STAGE_SECONDS_COLUMN][0].as_py())["dedup"] >= 0


def test_key_columns_read_back_from_the_staged_parquet(tmp_path):
    """A row without an exact hash has a signature of zeros, not a null one: pyarrow before 26 cannot read a null
    fixed-size list back from Parquet (apache/arrow#35692)."""
    records = [
        {"id": "s:1", "source": "s", "messages": conversation("hi there", "hello")},
        {"id": "s:2", "source": "s", "messages": None, "raw": "{bad", "drop_reason": "malformed:json"},
        {"id": "s:3", "source": "s", "messages": conversation("hi there", "hello"), "drop_reason": "filters:short"},
    ]
    table = pa.Table.from_pylist(records, schema=BASE_SCHEMA)
    for spec in (DedupSpec(num_perm=32, bands=8), DedupSpec(num_perm=32, bands=8, near=False)):
        keyed = AddKeyColumns(spec)(table)
        assert keyed.select(key_columns(spec)).column_names == key_columns(spec)
        pq.write_table(keyed, tmp_path / "staged.parquet")
        back = read_staged_files(pa.table({"path": [str(tmp_path / "staged.parquet")]}), key_columns(spec))
        assert back.equals(keyed.select(key_columns(spec)))
    assert SIGNATURE not in key_columns(DedupSpec(near=False))  # exact dedup alone stages no signatures


def test_verdicts_set_reason_and_dup_of_and_keep_earlier_reasons():
    rows = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "drop_reason": [None, None, None, "filters:short"],
            ROW_KEY: ["a\x00m\x00t.0", "b\x00m\x00t.1", "c\x00m\x00t.2", "d\x00m\x00t.3"],
            EXACT_HASH: ["h1", "h1", "h2", None],
        }
    )
    # b is an exact copy of a (two verdicts: the exact-copy flag, and its kept row from components), c a near copy
    # of a; verdicts come in several blocks, one of them empty and schema-less (as Ray's all-to-all operators emit).
    verdicts = merged_verdicts(
        [
            pa.table({ROW_KEY: ["b\x00m\x00t.1"], KEPT_ROW_KEY: pa.array([None], pa.string()), IS_EXACT_COPY: [True]}),
            pa.table({}),
            pa.table(
                {
                    ROW_KEY: ["b\x00m\x00t.1", "c\x00m\x00t.2"],
                    KEPT_ROW_KEY: ["a\x00m\x00t.0"] * 2,
                    IS_EXACT_COPY: [False] * 2,
                }
            ),
        ]
    )
    assert verdicts.num_rows == 2
    out = rows_with_verdicts(rows, verdicts)
    assert set(out.column_names) == {"id", "drop_reason", DUP_OF, STAGE_SECONDS_COLUMN}
    by_id = {r["id"]: r for r in out.to_pylist()}
    assert by_id["a"]["drop_reason"] is None and by_id["a"][DUP_OF] is None
    assert (by_id["b"]["drop_reason"], by_id["b"][DUP_OF]) == ("duplicate:exact", "a")
    assert (by_id["c"]["drop_reason"], by_id["c"][DUP_OF]) == ("duplicate:near", "a")
    assert by_id["d"]["drop_reason"] == "filters:short" and by_id["d"][DUP_OF] is None


def test_no_verdicts_keep_every_row():
    rows = pa.table({"id": ["a"], "drop_reason": pa.array([None], pa.string()), ROW_KEY: ["a\x00m\x00t.0"]})
    out = rows_with_verdicts(rows, merged_verdicts([]))
    assert out.to_pylist()[0]["drop_reason"] is None and out[DUP_OF].null_count == 1


def test_sketch_estimate_matches_the_full_signature():
    rng = np.random.default_rng(0)
    base = minhash_signatures([random_text(3, 200)], 128, 5)[0]
    for changed in (0, 13, 38, 64, 100):
        other = base.copy()
        other[:changed] = rng.integers(0, 2**32, changed, dtype=np.uint32)  # a changed slot takes a random value
        full = estimated_jaccard(base, other)
        assert abs(sketch_jaccard(signature_sketch(base), signature_sketch(other), 128) - full) < 0.05, changed
    odd = minhash_signatures([random_text(4, 50)], 17, 5)[0]
    assert (
        signature_sketch(odd).shape == (9,) and sketch_jaccard(signature_sketch(odd), signature_sketch(odd), 17) == 1.0
    )


# ---------------------------------------------------------------- connected components, one block at a time


def run_components(src: list[str], dst: list[str], max_iterations: int = 10) -> tuple[dict[str, str], int, bool]:
    """Iterate `propagate_labels` on one block (what each round does per hash partition) until it settles."""
    edges = pa.table({"src": pa.array(src, pa.string()), "dst": pa.array(dst, pa.string())})
    labels, rounds, settled = components.block_components(edges, max_iterations)
    return dict(zip(labels["node"].to_pylist(), labels["label"].to_pylist(), strict=True)), rounds, settled


def test_label_propagation_joins_a_chain_and_keeps_components_apart():
    labels, rounds, settled = run_components(["b", "c", "d", "y"], ["a", "b", "c", "x"])  # a-b-c-d and x-y
    assert labels == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}
    assert rounds == 4 and settled  # diameter 3, plus the round that hears nothing new


def test_label_propagation_stops_at_max_iterations_unsettled():
    labels, rounds, settled = run_components(["b", "c", "d"], ["a", "b", "c"], max_iterations=2)
    assert rounds == 2 and not settled
    assert labels["b"] == "a" and labels["d"] != "a"  # the chain's far end has not heard of "a" yet


def test_label_propagation_ignores_self_loops():
    labels, _, _ = run_components(["a", "b"], ["a", "a"])
    assert labels == {"a": "a", "b": "a"}


def test_a_graph_without_edges_has_no_labels():
    assert run_components([], []) == ({}, 0, True)
    assert run_components(["a"], ["a"]) == ({}, 0, True)  # a self-loop is no edge


# ---------------------------------------------------------------- verdicts for key rows held in one table


def corpus_records() -> list[dict]:
    """40 conversations, then copies of some of them (exact, near, a near chain), a dropped copy and empty rows."""
    texts = [random_text(100 + i, 60) for i in range(40)]
    messages = [conversation(f"question {i}", text) for i, text in enumerate(texts)]
    records = [{"id": f"s:{i:02d}", "source": "s", "messages": m} for i, m in enumerate(messages)]
    chain_b = change_word(texts[9], 12)
    records += [
        {"id": "s:50", "source": "s", "messages": conversation("QUESTION 3 ", texts[3])},  # exact copy of 03
        {"id": "s:51", "source": "s", "messages": conversation("question 5", change_word(texts[5], 30))},  # near 05
        {"id": "s:52", "source": "s", "messages": conversation("question 5", change_word(texts[5], 31))},  # near 05
        {"id": "s:53", "source": "s", "messages": conversation("question 7", texts[7]), "drop_reason": "filters:x"},
        {"id": "s:00", "source": "s", "messages": conversation("question 0", texts[0])},  # same id, same text
        # a chain: 60 is a near copy of 09 and 61 of 60, but 61 is not near 09 (estimated Jaccard ~0.62)
        {"id": "s:60", "source": "s", "messages": conversation("question 9", chain_b)},
        {"id": "s:61", "source": "s", "messages": conversation("question 9", change_word(chain_b, 47))},
        {"id": "s:70", "source": "s", "messages": conversation(" ", "")},  # no words: no exact or near key
        {"id": "s:71", "source": "s", "messages": None, "raw": "{bad", "drop_reason": "malformed:json"},
    ]
    return records


def keyed_corpus(spec: DedupSpec) -> tuple[pa.Table, dict[str, str]]:
    """Key rows (as the staging pass writes them) of `corpus_records`, and each row key's id."""
    keyed = AddKeyColumns(spec)(pa.Table.from_pylist(corpus_records(), schema=BASE_SCHEMA))
    ids = dict(zip(keyed[ROW_KEY].to_pylist(), keyed["id"].to_pylist(), strict=True))
    return keyed.select(key_columns(spec)), ids


def verdicts_by_id(verdicts: pa.Table, ids: dict[str, str]) -> dict[str, tuple[str | None, bool]]:
    """Each duplicate's id -> (the id of the row its group keeps, whether it is an exact copy)."""
    merged = merged_verdicts([verdicts])
    columns = (merged[name].to_pylist() for name in (ROW_KEY, KEPT_ROW_KEY, IS_EXACT_COPY))
    return {ids[row]: (ids.get(kept), is_exact) for row, kept, is_exact in zip(*columns, strict=True)}


def test_verdicts_in_one_table_link_copies_to_the_row_their_group_keeps():
    spec = DedupSpec(num_perm=128, bands=32, threshold=0.7)
    keys, ids = keyed_corpus(spec)
    verdicts, rounds, settled = verdicts_in_one_table(keys, spec)
    assert settled and rounds >= 1
    assert verdicts_by_id(verdicts, ids) == {
        "s:50": ("s:03", True),
        "s:51": ("s:05", False),
        "s:52": ("s:05", False),
        "s:00": ("s:00", True),  # the second row with id s:00 and its text; its group keeps the first
        "s:60": ("s:09", False),
        "s:61": ("s:09", False),  # near 60 only, but in 09's group
    }


def curated(spec: DedupSpec, staging: Path, batch_rows: int = 7) -> dict[str, list[tuple[str | None, str | None]]]:
    """`corpus_records` through the step's pure pieces in its order, in batches as Ray Data hands them over and
    staged as Parquet files: each id's ``(drop_reason, dup_of)`` (two for the id that occurs twice)."""
    table = pa.Table.from_pylist(corpus_records(), schema=BASE_SCHEMA)
    staging.mkdir()
    files = pa.table({"path": [str(staging / f"{start}.parquet") for start in range(0, table.num_rows, batch_rows)]})
    for start, path in zip(range(0, table.num_rows, batch_rows), files["path"].to_pylist(), strict=True):
        pq.write_table(AddKeyColumns(spec)(table.slice(start, batch_rows)), path)
    verdicts, _, _ = verdicts_in_one_table(read_staged_files(files, key_columns(spec)), spec)
    merged = merged_verdicts([verdicts])
    out: dict[str, list[tuple[str | None, str | None]]] = {}
    for path in files["path"].to_pylist():
        for row in rows_with_verdicts(pq.read_table(path), merged).to_pylist():
            out.setdefault(row["id"], []).append((row["drop_reason"], row[DUP_OF]))
    return {key: sorted(value, key=lambda pair: pair[0] or "") for key, value in out.items()}


def test_a_fixed_corpus_keeps_and_drops_the_same_rows_with_the_same_reasons(tmp_path):
    kept = {f"s:{i:02d}": [(None, None)] for i in range(40)}
    exact, near = "duplicate:exact", "duplicate:near"
    expected = {
        **kept,
        "s:00": [(None, None), (exact, "s:00")],
        "s:50": [(exact, "s:03")],
        "s:51": [(near, "s:05")],
        "s:52": [(near, "s:05")],
        "s:53": [("filters:x", None)],
        "s:60": [(near, "s:09")],
        "s:61": [(near, "s:09")],
        "s:70": [(None, None)],
        "s:71": [("malformed:json", None)],
    }
    assert curated(DedupSpec(num_perm=128, bands=32, threshold=0.7), tmp_path / "both") == expected
    exact_only = {**expected, **{i: [(None, None)] for i in ("s:51", "s:52", "s:60", "s:61")}}
    assert curated(DedupSpec(num_perm=128, bands=32, threshold=0.7, near=False), tmp_path / "exact") == exact_only
    near_only = {**expected, "s:00": [(None, None), (near, "s:00")], "s:50": [(near, "s:03")]}
    assert curated(DedupSpec(num_perm=128, bands=32, threshold=0.7, exact=False), tmp_path / "near") == near_only
    # A stricter threshold keeps every near copy.
    assert curated(DedupSpec(num_perm=128, bands=32, threshold=0.95), tmp_path / "strict") == {
        **expected,
        **{i: [(None, None)] for i in ("s:51", "s:52", "s:60", "s:61")},
    }


def test_verdicts_in_one_table_for_exact_only_and_near_only():
    keys, ids = keyed_corpus(DedupSpec(num_perm=128, bands=32))
    exact_only, _, _ = verdicts_in_one_table(keys, DedupSpec(num_perm=128, bands=32, near=False))
    assert verdicts_by_id(exact_only, ids) == {"s:50": ("s:03", True), "s:00": ("s:00", True)}
    near_only, _, _ = verdicts_in_one_table(keys, DedupSpec(num_perm=128, bands=32, exact=False, threshold=0.7))
    assert verdicts_by_id(near_only, ids) == {  # exact copies are near copies at similarity 1
        "s:50": ("s:03", False),
        "s:51": ("s:05", False),
        "s:52": ("s:05", False),
        "s:00": ("s:00", False),
        "s:60": ("s:09", False),
        "s:61": ("s:09", False),
    }
    empty, rounds, settled = verdicts_in_one_table(keys.slice(0, 0), DedupSpec(num_perm=128, bands=32))
    assert (empty.num_rows, rounds, settled) == (0, 0, True)


def test_importing_dedup_leaves_datasketch_and_scipy_to_the_signature_pass():
    """Workers that only unpickle a dedup function (shuffles, verdicts) must not pay datasketch's scipy import."""
    code = "import sys, chatforge.data.dedup; print(sorted(m for m in ('datasketch', 'scipy') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_shuffle_partitions_follow_the_data_unless_configured():
    assert components.partitions_for(0) == 1
    assert components.partitions_for(components.PARTITION_BYTES) == 1
    assert components.partitions_for(components.PARTITION_BYTES + 1) == 2
    assert components.partitions_for(10 * components.PARTITION_BYTES) == 10
    assert components.partitions_for(10 * components.PARTITION_BYTES, configured=3) == 3


def test_bands_share_a_shuffle_while_they_fit_the_budget():
    assert bands_per_shuffle(16, band_bytes=10, budget=1000) == 16
    assert bands_per_shuffle(16, band_bytes=100, budget=1000) == 10
    assert bands_per_shuffle(16, band_bytes=5000, budget=1000) == 1
    assert bands_per_shuffle(16, band_bytes=0, budget=1000) == 16


def test_keys_go_to_one_task_only_when_every_shuffle_would_be_one_partition():
    spec = DedupSpec(num_perm=128, bands=16)
    small = ShufflePlan.of(spec, rows=30_000, column_bytes={ROW_KEY: 1 << 20, EXACT_HASH: 1 << 20, SIGNATURE: 15 << 20})
    assert (small.exact_partitions, small.bands_per_shuffle, small.band_partitions) == (1, 16, 1)
    assert small.fits_one_task(spec)
    large = ShufflePlan.of(
        spec, rows=120_000, column_bytes={ROW_KEY: 8 << 20, EXACT_HASH: 4 << 20, SIGNATURE: 60 << 20}
    )
    assert large.exact_partitions == 2 and not large.fits_one_task(spec)
    one = DedupSpec(num_perm=128, bands=16, num_partitions=1)  # configured
    assert ShufflePlan.of(
        one, rows=30_000, column_bytes={ROW_KEY: 1 << 20, EXACT_HASH: 1 << 20, SIGNATURE: 15 << 20}
    ).fits_one_task(one)
    three = DedupSpec(num_perm=128, bands=16, num_partitions=3)
    assert not ShufflePlan.of(three, rows=10, column_bytes={ROW_KEY: 10, EXACT_HASH: 10, SIGNATURE: 10}).fits_one_task(
        three
    )
    # Bands alone can outgrow one partition: the exact shuffle fits, the band rows (16 per row) do not; they go in
    # groups of bands that each fit one partition.
    banded = ShufflePlan.of(
        spec, rows=60_000, column_bytes={ROW_KEY: 4 << 20, EXACT_HASH: 2 << 20, SIGNATURE: 30 << 20}
    )
    assert banded.exact_partitions == 1 and banded.band_partitions == 1 and banded.bands_per_shuffle < 16
    assert not banded.fits_one_task(spec) and banded.fits_one_task(DedupSpec(num_perm=128, bands=16, near=False))
    # One band bigger than a partition: a keyed shuffle of several partitions per band.
    huge = ShufflePlan.of(
        spec, rows=2_000_000, column_bytes={ROW_KEY: 100 << 20, EXACT_HASH: 64 << 20, SIGNATURE: 1 << 30}
    )
    assert (huge.bands_per_shuffle, huge.band_partitions) == (1, 4)


def test_staged_column_bytes_reads_rows_and_sizes_from_the_footers(tmp_path):
    # Distinct values, as staged rows are: the footer counts encoded bytes, and repeats would dictionary-encode.
    small = pa.table({"row": [f"a{i}" for i in range(10)], "text": [f"{i:010d}" for i in range(10)]})
    large = pa.table({"row": [f"b{i}" for i in range(30)], "text": [f"{i:01000d}" for i in range(30)]})
    pq.write_table(small, tmp_path / "0.parquet")
    pq.write_table(large, tmp_path / "1.parquet", row_group_size=10)
    rows, sizes = staged_column_bytes([str(tmp_path / "0.parquet"), str(tmp_path / "1.parquet")], ["text", "gone"])
    assert rows == 40
    assert sizes["gone"] == 0
    assert 30 * 1000 <= sizes["text"] < 2 * (30 * 1000 + 10 * 10)
