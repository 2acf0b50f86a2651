"""DedupStep on a 2-CPU Ray: seeded exact copies, one-word near copies and a near-copy chain among 300 conversations."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.config import DedupSpec
from chatforge.data.dedup import DedupStep, estimated_jaccard, minhash_signatures, normalized_conversation
from chatforge.data.schema import BASE_SCHEMA, STAGE_SECONDS_COLUMN

pytestmark = pytest.mark.integration

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "do", "gu", "ha", "ji", "be", "wo", "fy"]
ORIGINALS = 300
EXACT_COPIES = range(0, 30)  # originals that get a whitespace/case copy
NEAR_COPIES = range(30, 80)  # originals that get a copy with one word changed
# 256 permutations in 32 bands of 8 rows: a one-word change in 60 words (Jaccard ~0.84) is found, two (~0.70) are not.
SPEC = DedupSpec(num_perm=256, bands=32, threshold=0.77)


def vocabulary(rng: random.Random, size: int = 400) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def conversation(rng: random.Random, words: list[str], n_words: int) -> list[dict[str, str]]:
    turns = rng.randint(2, 4)
    cuts = sorted(rng.sample(range(1, n_words), turns - 1))
    spans = zip([0, *cuts], [*cuts, n_words], strict=True)
    return [
        {"role": ("user", "assistant")[t % 2], "content": " ".join(rng.choice(words) for _ in range(end - start))}
        for t, (start, end) in enumerate(spans)
    ]


def with_word_changed(messages: list[dict[str, str]], position: int, word: str) -> list[dict[str, str]]:
    """A copy with the word at ``position`` (counted over the whole conversation) replaced."""
    out = []
    for message in messages:
        words = message["content"].split()
        if 0 <= position < len(words):
            words[position] = word
        position -= len(words)
        out.append({"role": message["role"], "content": " ".join(words)})
    return out


def with_whitespace_and_case_changed(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": "  " + m["content"].upper().replace(" ", " \n\t ") + " "} for m in messages]


def record(record_id: str, messages: list[dict[str, str]], drop_reason: str | None = None, origin: str = "") -> dict:
    meta = json.dumps({"origin": origin or record_id})
    return {
        "id": record_id,
        "source": "syn",
        "messages": messages,
        "meta": meta,
        "raw": None,
        "drop_reason": drop_reason,
    }


@pytest.fixture(scope="module")
def corpus():
    """Originals ``syn:oNNN``; every copy gets a larger id (x..., p..., c1, c2) so the original is the one kept."""
    rng = random.Random(2024)
    words = vocabulary(rng)
    originals = [conversation(rng, words, rng.randint(60, 150)) for _ in range(ORIGINALS)]
    records = [record(f"syn:o{i:03d}", messages) for i, messages in enumerate(originals)]
    records += [record(f"syn:x{i:03d}", with_whitespace_and_case_changed(originals[i])) for i in EXACT_COPIES]
    for i in NEAR_COPIES:
        position = rng.randrange(sum(len(m["content"].split()) for m in originals[i]))
        records.append(record(f"syn:p{i:03d}", with_word_changed(originals[i], position, "qqqq")))
    # a~b and b~c, but a !~ c: two single-word edits far apart in 60 words
    chain_a = conversation(rng, words, 60)
    chain_b = with_word_changed(chain_a, 12, "qqqq")
    chain_c = with_word_changed(chain_b, 47, "zzzz")
    records += [record("syn:c0", chain_a), record("syn:c1", chain_b), record("syn:c2", chain_c)]
    # Only kept rows take part: a dropped copy with a smaller id must not displace the original.
    records.append(record("syn:a005", originals[5], drop_reason="filters:too_short"))
    # Same id, same content, another origin (ids fall back to a content hash): exactly one of the two is kept.
    records.append(record("syn:o010", originals[10], origin="other-file#0"))
    random.Random(0).shuffle(records)
    return records, (chain_a, chain_b, chain_c)


def test_chain_premise(corpus):
    """The chain tests connected components only if a and c are not similar enough on their own."""
    _, chain = corpus
    a, b, c = minhash_signatures([normalized_conversation(m) for m in chain], SPEC.num_perm, SPEC.shingle_words)
    assert estimated_jaccard(a, b) >= SPEC.threshold and estimated_jaccard(b, c) >= SPEC.threshold
    assert estimated_jaccard(a, c) < SPEC.threshold


@pytest.mark.parametrize("partitions", [None, 3], ids=["keys-in-one-task", "keys-through-shuffles"])
def test_dedup_marks_copies_and_keeps_one_row_per_group(ray_local, corpus, tmp_path, monkeypatch, partitions):
    from chatforge.data import dedup

    def not_this_way(*args, **kwargs):
        raise AssertionError(f"dedup.num_partitions={partitions} took the wrong way to its verdicts")

    # Small keys go to one task; configured partitions (or keys too big for one) go through Ray Data's shuffles.
    if partitions is None:
        monkeypatch.setattr(DedupStep, "_verdicts_by_shuffles", not_this_way)
    else:
        monkeypatch.setattr(dedup, "_verdicts_task", SimpleNamespace(remote=not_this_way))
    records, _ = corpus
    table = pa.Table.from_pylist(records, schema=BASE_SCHEMA)
    ds = ray_local.data.from_arrow([table.slice(start, 60) for start in range(0, table.num_rows, 60)])

    spec = SPEC.model_copy(update={"num_partitions": partitions})
    rows = DedupStep(spec, workdir=str(tmp_path))(ds).take_all()

    assert len(rows) == len(records)
    assert set(rows[0]) == {*BASE_SCHEMA.names, "dup_of", STAGE_SECONDS_COLUMN}
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    state = {rid: (found[0]["drop_reason"], found[0]["dup_of"]) for rid, found in by_id.items()}

    # The corpus, the hashes and the seeds are fixed, so which rows are kept is too: every copy is found.
    expected = {f"syn:o{i:03d}": (None, None) for i in range(ORIGINALS) if i != 10}
    expected |= {f"syn:x{i:03d}": ("duplicate:exact", f"syn:o{i:03d}") for i in EXACT_COPIES}
    expected |= {f"syn:p{i:03d}": ("duplicate:near", f"syn:o{i:03d}") for i in NEAR_COPIES}
    expected |= {"syn:c0": (None, None), "syn:c1": ("duplicate:near", "syn:c0"), "syn:c2": ("duplicate:near", "syn:c0")}
    expected |= {"syn:a005": ("filters:too_short", None)}
    assert {rid: value for rid, value in state.items() if rid != "syn:o010"} == expected
    same_id = sorted((r["drop_reason"] or "", r["dup_of"] or "") for r in by_id["syn:o010"])
    assert same_id == [("", ""), ("duplicate:exact", "syn:o010")]

    kept = {row["id"] for row in rows if row["drop_reason"] is None}
    assert {row["dup_of"] for row in rows if row["dup_of"] is not None} <= kept
    assert all(row["drop_reason"].startswith("duplicate:") for row in rows if row["dup_of"] is not None)
    seconds = sum(dict(row[STAGE_SECONDS_COLUMN] or []).get("dedup", 0.0) for row in rows)
    assert seconds > 0


def test_exact_only_leaves_near_copies_alone(ray_local, corpus, tmp_path):
    records, _ = corpus
    ds = ray_local.data.from_arrow(pa.Table.from_pylist(records, schema=BASE_SCHEMA))

    rows = DedupStep(DedupSpec(near=False, num_partitions=3), workdir=str(tmp_path))(ds).take_all()

    reasons = {row["id"]: row["drop_reason"] for row in rows if row["id"] != "syn:o010"}
    assert len(rows) == len(records)
    assert all(reasons[f"syn:x{i:03d}"] == "duplicate:exact" for i in EXACT_COPIES)
    assert all(reasons[f"syn:p{i:03d}"] is None for i in NEAR_COPIES)
    assert [reasons[f"syn:c{i}"] for i in range(3)] == [None, None, None]


def test_dedup_streams_rows_from_its_staging_dir_and_handles_no_kept_rows(ray_local, corpus, tmp_path, monkeypatch):
    from chatforge.data import dedup

    # Staged files of at most STAGED_FILE_ROWS rows: the final pass reads one per task, so its memory is bounded.
    monkeypatch.setattr(dedup, "STAGED_FILE_ROWS", 16)
    records, _ = corpus
    dropped = [{**r, "drop_reason": "filters:short"} for r in records[:50]]
    ds = ray_local.data.from_arrow(pa.Table.from_pylist(dropped, schema=BASE_SCHEMA))
    rows = DedupStep(SPEC, workdir=str(tmp_path))(ds).take_all()
    assert len(rows) == 50 and all(r["drop_reason"] == "filters:short" and r["dup_of"] is None for r in rows)
    (staged,) = tmp_path.iterdir()  # the rows went to disk once, and come back from there
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in staged.glob("*.parquet")]
    assert sum(sizes) == 50 and len(sizes) >= 4 and max(sizes) <= 16


def test_components_label_a_chain_when_the_edges_hold_empty_blocks(ray_local):
    from chatforge.data.components import connected_components, without_empty_blocks

    edges = ray_local.data.from_arrow(
        [pa.table({"src": ["b"], "dst": ["a"]}), pa.table({}), pa.table({"src": ["c"], "dst": ["b"]}), pa.table({})]
    )
    cleaned = without_empty_blocks(edges.materialize())
    assert cleaned.num_blocks() == 2 and cleaned.count() == 2
    for partitions in (1, 3):  # one partition takes the split repartition, more the keyed shuffle
        labels = connected_components(edges, num_partitions=partitions, max_iterations=10).labels.take_all()
        assert {row["node"]: row["label"] for row in labels} == {"a": "a", "b": "a", "c": "a"}


def test_a_graph_that_fits_one_partition_settles_in_one_task(ray_local, monkeypatch, caplog):
    from chatforge.data import components

    def no_executions_per_round(*args):
        raise AssertionError("a one-partition graph ran its rounds as Ray Data executions")

    monkeypatch.setattr(components, "_rounds", no_executions_per_round)
    edges = ray_local.data.from_items(
        [{"src": s, "dst": d} for s, d in [("b", "a"), ("c", "b"), ("d", "c"), ("y", "x")]], override_num_blocks=2
    )
    result = components.connected_components(edges, num_partitions=None, max_iterations=10)
    labels = {row["node"]: row["label"] for row in result.labels.take_all()}
    assert labels == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}
    assert (result.rounds, result.converged) == (4, True)
    with caplog.at_level("WARNING", logger=components.__name__):
        cut_short = components.connected_components(edges, num_partitions=None, max_iterations=2)
    assert (cut_short.rounds, cut_short.converged) == (2, False)
    assert "did not settle in 2 rounds" in caplog.text


def test_hash_partitions_hold_each_key_whole_and_one_partition_needs_no_keyed_shuffle(ray_local):
    from chatforge.data.components import hash_partitioned

    ds = ray_local.data.from_items([{"key": i % 7, "value": i} for i in range(200)], override_num_blocks=5)
    for partitions in (1, 3):
        parted = hash_partitioned(ds, "key", partitions).materialize()
        blocks = [ray_local.get(entry.ref) for bundle in parted.iter_internal_ref_bundles() for entry in bundle.blocks]
        blocks = [block for block in blocks if block.num_rows]
        assert sum(block.num_rows for block in blocks) == 200
        assert len(blocks) <= partitions
        owners = [frozenset(block["key"].to_pylist()) for block in blocks]
        assert sum(len(keys) for keys in owners) == 7  # no key in two blocks
        # The keyed shuffle starts worker pools of its own; one partition must not pay for them.
        assert ("HashShuffle" in parted.stats()) == (partitions > 1)
