"""The whole curation pipeline on a 2-CPU Ray: a corrupted dump, exact accounting, outputs, stability."""

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.config import load_spec
from chatforge.data.pipeline import AccountingError, run_curation
from chatforge.data.sources import BOM, ReadCounts
from helpers.corpus import conversation, sharegpt_record

pytestmark = pytest.mark.integration

BAD_RECORDS = {
    "missing_messages": {"id": "bad-missing", "text": "no conversations key"},
    "unknown_role": {
        "id": "bad-role",
        "conversations": [{"from": "wizard", "value": "abracadabra"}, {"from": "gpt", "value": "ok"}],
    },
    "non_string_content": {
        "id": "bad-type",
        "conversations": [{"from": "human", "value": {"nested": 1}}, {"from": "gpt", "value": "ok"}],
    },
    "bad_turn": {"id": "bad-turn", "conversations": [{"from": "human"}, {"from": "gpt", "value": "ok"}]},
    "not_an_object": "a bare string where a record should be",
}


def read_dir(path):
    return pq.ParquetDataset(str(path)).read().to_pylist()


def corrupted_dump(tmp_path):
    rng = random.Random(7)
    valid = [sharegpt_record(f"ok{i}", conversation(rng, turns=4)) for i in range(60)]
    items = valid[:30] + list(BAD_RECORDS.values()) + valid[30:]
    items.append(
        {"id": "empty-turn", "conversations": [{"from": "human", "value": "hello?"}, {"from": "gpt", "value": ""}]}
    )
    items.append(
        {"id": "huge", "conversations": [{"from": "human", "value": "x " * 1_000_000}, {"from": "gpt", "value": "ok"}]}
    )
    text = json.dumps(items)
    cut = json.dumps(sharegpt_record("cut", conversation(rng, turns=2)))
    path = tmp_path / "dump.json"
    path.write_text(text[:-1] + ", " + cut[: len(cut) // 2])  # the dump ends mid-record
    return path, {r["id"] for r in valid}


def test_corrupted_dump_is_fully_accounted(ray_local, tmp_path):
    dump, valid_ids = corrupted_dump(tmp_path)
    out = tmp_path / "out"
    spec = load_spec(
        None, [f"curate.output={out}", f"curate.sources=[{{name: dump, format: sharegpt, path: '{dump}'}}]"]
    )
    manifest = run_curation(spec).manifest

    assert manifest["input_records"] == 60 + len(BAD_RECORDS) + 3
    assert manifest["input_records"] == manifest["kept"] + sum(manifest["dropped"].values())
    for reason in BAD_RECORDS:
        assert manifest["dropped"][f"malformed:{reason}"] == 1
    assert manifest["dropped"]["malformed:truncated"] == 1
    assert manifest["dropped"]["empty_turn"] == 1
    assert manifest["dropped"]["message_too_long"] == 1

    kept = [
        row
        for split in ("train", "val", "test")
        if (out / "data" / split).exists()
        for row in read_dir(out / "data" / split)
    ]
    assert len(kept) == manifest["kept"] == sum(manifest["splits"].values())
    assert {row["id"].removeprefix("dump:") for row in kept} == valid_ids
    dropped = read_dir(out / "dropped")
    assert len(dropped) == sum(manifest["dropped"].values())
    by_reason = {row["drop_reason"]: row for row in dropped}
    assert by_reason["malformed:truncated"]["raw"].startswith('{"id": "cut"')
    assert json.loads(by_reason["malformed:unknown_role"]["raw"])["id"] == "bad-role"
    assert by_reason["malformed:not_an_object"]["raw"] == json.dumps(BAD_RECORDS["not_an_object"])
    assert len(by_reason["message_too_long"]["messages"][0]["content"]) > 1_000_000

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["fingerprint"] == manifest["fingerprint"] and on_disk["config"]["output"] == str(out)
    assert [s["name"] for s in on_disk["stages"]] == ["read", *spec.curate.steps]


def test_two_sources_pii_dedup_and_stable_splits(ray_local, tmp_path):
    rng = random.Random(3)
    base = [conversation(rng, turns=4, words=(12, 20)) for _ in range(80)]
    base[0][0]["content"] += " write to alice@example.com or call +44 20 7946 0958"
    openai_path = tmp_path / "a.jsonl"
    openai_path.write_text("\n".join(json.dumps({"id": f"a{i}", "messages": m}) for i, m in enumerate(base)) + "\n")
    sharegpt_path = tmp_path / "b.jsonl"  # exact copies of the first ten, in another source and format
    sharegpt_path.write_text("\n".join(json.dumps(sharegpt_record(f"b{i}", m)) for i, m in enumerate(base[:10])) + "\n")
    sources = (
        f"[{{name: a, format: openai, path: '{openai_path}'}}, {{name: b, format: sharegpt, path: '{sharegpt_path}'}}]"
    )
    overrides = [f"curate.sources={sources}", "curate.augment.slice_turns=true", "curate.read.range_bytes=65536"]

    first = run_curation(load_spec(None, [*overrides, f"curate.output={tmp_path / 'o1'}"])).manifest
    assert first["input_records"] == 90
    assert first["dropped"] == {"duplicate:exact": 10}
    # b0 is an exact copy of a0: it is scrubbed too (before dedup marks it), so each value is replaced twice
    assert first["pii_replacements"] == {"email": 2, "phone": 2}
    assert first["augmented"] == 80  # one slice per 4-turn conversation
    assert first["rows_written"] == first["kept"] + first["augmented"] == sum(first["splits"].values())
    rows = {r["id"]: r for r in read_dir(tmp_path / "o1" / "data" / "train")}
    text = " ".join(m["content"] for r in rows.values() for m in r["messages"])
    assert "alice@example.com" not in text and "[EMAIL_1]" in text
    assert all(
        rows[r["parent_id"]]["split"] == "train" for r in rows.values() if r["augmented"] and r["parent_id"] in rows
    )

    second = run_curation(load_spec(None, [*overrides, f"curate.output={tmp_path / 'o2'}"])).manifest
    assert second["splits"] == first["splits"]
    ids = lambda d: sorted(r["id"] for r in read_dir(d))  # noqa: E731
    assert ids(tmp_path / "o1" / "data" / "val") == ids(tmp_path / "o2" / "data" / "val")


def write_parquet(path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_inputs_that_stopped_runs_are_counted_and_a_failed_rerun_keeps_the_output(ray_local, tmp_path, monkeypatch):
    rng = random.Random(11)
    good = [json.dumps({"id": f"g{i}", "messages": conversation(rng, turns=4)}) for i in range(12)]
    turns = '[{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]'
    dump = tmp_path / "dump"
    (dump / "sub").mkdir(parents=True)
    (dump / "a.jsonl").write_bytes(
        BOM
        + "\n".join(
            [
                *good[:3],
                '{"id": "s1", "messages": [{"role": "user", "content": "half a pair \\ud800"}]}',
                f'{{"id": "s2", "messages": {turns}, "\\udc00": 1}}',
                "[" * 100_000,
                '{"id": "big", "messages": [], "n": ' + "9" * 5000 + "}",
            ]
        ).encode()
    )
    (dump / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(good[3:6]).encode()))
    (dump / "sub" / "c.ndjson").write_text("\n".join(good[6:9]) + "\n")
    with pa.output_stream(str(dump / "D.JSONL.zst"), compression="zstd") as f:
        f.write(("\n".join([*good[9:], '{"id": "cut", "mess']) + "\n").encode())
    (dump / "readme.txt").write_text("not a conversation")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    write_parquet(tmp_path / "int_id.parquet", [{"id": 1, "messages": messages}, {"id": 2, "messages": messages}])
    write_parquet(tmp_path / "struct_meta.parquet", [{"id": "m", "messages": messages, "meta": {"origin": "x"}}])
    out = tmp_path / "out"
    sources = (
        f"[{{name: dump, format: openai, path: '{dump}'}},"
        f" {{name: ints, format: parquet, path: '{tmp_path / 'int_id.parquet'}'}},"
        f" {{name: structs, format: parquet, path: '{tmp_path / 'struct_meta.parquet'}'}}]"
    )
    spec = load_spec(None, [f"curate.output={out}", f"curate.sources={sources}", "curate.dedup.near=false"])
    manifest = run_curation(spec).manifest

    assert manifest["dropped"] == {
        "malformed:bad_id": 2,
        "malformed:invalid_json": 2,
        "malformed:lone_surrogate": 2,
        "malformed:bad_meta": 1,
        "malformed:too_deep": 1,
    }
    assert manifest["input_records"] == 12 + 4 + 1 + 3 == manifest["kept"] + sum(manifest["dropped"].values())
    assert manifest["kept"] == 12 and manifest["dropped_rows_written"] == 8
    assert manifest["sources"][0]["skipped"] == [str(dump / "readme.txt")]
    kept_ids = {row["id"] for split in ("train", "val", "test") for row in read_dir(out / "data" / split)}
    assert kept_ids == {f"dump:g{i}" for i in range(12)}  # g0 comes after a byte-order mark
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump", "int_id.parquet", "out", "struct_meta.parquet"]

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(ReadCounts, "total", lambda self: (1_000, []))
    with pytest.raises(AccountingError, match="the readers emitted 1,000 records but 20 reached the write"):
        run_curation(spec)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump", "int_id.parquet", "out", "struct_meta.parquet"]


def test_a_parquet_directory_of_mixed_schemas_is_read_row_by_row(ray_local, tmp_path):
    messages = [{"role": "user", "content": "question here"}, {"role": "assistant", "content": "an answer"}]
    parts = tmp_path / "parts"
    parts.mkdir()
    write_parquet(parts / "a_good.parquet", [{"id": "g1", "messages": messages, "meta": '{"origin": "x"}'}])
    write_parquet(parts / "b_int_id.parquet", [{"id": 7, "messages": messages}])
    write_parquet(parts / "c_struct_meta.parquet", [{"id": "s", "messages": messages, "meta": {"origin": "y"}}])
    spec = load_spec(
        None,
        [
            f"curate.output={tmp_path / 'out'}",
            f"curate.sources=[{{name: pq, format: parquet, path: '{parts}'}}]",
            "curate.steps=[normalize, filters]",
        ],
    )
    manifest = run_curation(spec).manifest
    assert manifest["input_records"] == 3 and manifest["kept"] == 1
    assert manifest["dropped"] == {"malformed:bad_id": 1, "malformed:bad_meta": 1}
    origins = sorted(json.loads(row["meta"])["origin"] for row in read_dir(tmp_path / "out" / "dropped"))
    assert origins == [f"{parts / 'b_int_id.parquet'}#row=0", f"{parts / 'c_struct_meta.parquet'}#row=0"]


def test_a_ray_dataset_is_a_source_counted_checked_and_fingerprinted_like_a_file(ray_local, tmp_path):
    import ray.data

    from chatforge.data.sources import SourceError, dataset_source

    rng = random.Random(3)
    rows = [
        {"id": f"c{i}", "messages": conversation(rng, turns=4), "meta": json.dumps({"n": i}), "extra": i}
        for i in range(40)
    ]
    rows.append({"id": "bad-role", "messages": [{"role": "wizard", "content": "hm"}], "meta": None, "extra": 0})
    rows.append({"id": "bad-meta", "messages": conversation(rng, turns=2), "meta": "{not json", "extra": 0})
    out = tmp_path / "out"
    spec = load_spec(None, [f"curate.output={out}", "curate.sources=[]", "curate.steps=[normalize, filters, split]"])
    manifest = run_curation(spec, datasets={"given": ray.data.from_items(rows)}).manifest
    assert manifest["input_records"] == 42 and manifest["kept"] == 40
    assert manifest["dropped"] == {"malformed:bad_meta": 1, "malformed:unknown_role": 1}
    (source,) = manifest["sources"]
    assert (source["name"], source["format"], source["rows"]) == ("given", "dataset", 42)
    kept = read_dir(out / "data")
    assert {row["id"] for row in kept} == {f"c{i}" for i in range(40)}
    assert json.loads(kept[0]["meta"])["n"] in range(40)  # meta kept; columns curation does not read are not

    # the fingerprint is the rows', whatever the blocks; other rows, another fingerprint
    same = dataset_source("given", ray.data.from_items(rows, override_num_blocks=5))
    assert same.fingerprint == dataset_source("given", ray.data.from_items(rows[::-1])).fingerprint
    assert same.rows == 42 and same.fingerprint != dataset_source("given", ray.data.from_items(rows[1:])).fingerprint
    with pytest.raises(SourceError, match="no `messages` column"):
        run_curation(spec, datasets={"given": ray.data.from_items([{"text": "hi"}])})
    with pytest.raises(SourceError, match="nothing to curate"):
        run_curation(spec)


def test_the_condition_step_regenerates_earlier_assistant_turns_of_any_source(ray_local, tmp_path):
    """`condition` as a step of an ordinary file curation: a ShareGPT file, a model dir, the counts in the manifest,
    the originals in meta, and the regenerated turns scored by the toxicity step after it."""
    from helpers.tiny_model import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    rng = random.Random(5)
    conversations = [conversation(rng, turns=turns, words=(3, 6)) for turns in [2, 4, 6] * 4]
    source = tmp_path / "dump.jsonl"
    source.write_text("".join(json.dumps(sharegpt_record(f"r{i}", c)) + "\n" for i, c in enumerate(conversations)))
    out = tmp_path / "out"
    overrides = [
        f"curate.output={out}",
        f"curate.sources=[{{name: dump, format: sharegpt, path: '{source}'}}]",
        "curate.steps=[normalize, filters, condition, toxicity, split]",
        "curate.toxicity.backend=profanity",
        "curate.toxicity.assistant_policy=flag",
        "curate.condition.temperature=0",
        "curate.condition.max_new_tokens=5",
        "curate.condition.batch_size=4",
    ]
    with pytest.raises(ValueError, match="neither curate.condition.model nor curate.condition.endpoint"):
        load_spec(None, overrides)
    manifest = run_curation(load_spec(None, [*overrides, f"curate.condition.model={model}"])).manifest

    earlier = sum(len(c) // 2 - 1 for c in conversations)  # each assistant turn but the last
    assert manifest["kept"] == 12 and manifest["input_records"] == 12
    assert manifest["conditioning"] == {"conversations": 8, "regenerated_turns": earlier, "kept_turns": 0}
    assert "condition" in [stage["name"] for stage in manifest["stages"]]
    rows = {row["id"]: row for row in read_dir(out / "data")}
    for i, original in enumerate(conversations):
        row = rows[f"dump:r{i}"]
        messages = row["messages"]
        assert [m["role"] for m in messages] == [m["role"] for m in original]
        assert messages[-1] == original[-1] and [m for m in messages if m["role"] == "user"] == [
            m for m in original if m["role"] == "user"
        ]
        regenerated = json.loads(row["meta"]).get("conditioned_from", {})
        assert {int(k): v for k, v in regenerated.items()} == {
            j: original[j]["content"] for j in range(1, len(original) - 1, 2)
        }
        assert row["toxicity"] is not None  # scored after conditioning


def test_compat_block_refs_lists_the_blocks_that_hold_rows_and_its_fallback_lists_all(ray_local, monkeypatch):
    """The canary of compat.block_refs (Ray Data's RefBundle shape, a DeveloperAPI): the rows survive, empty blocks
    are left out; switched off, every block's ref (to_arrow_refs) carries the same rows."""
    import ray.data

    from chatforge import compat

    ds = ray.data.range(40, override_num_blocks=4).filter(lambda row: row["id"] < 5).materialize()

    def rows(refs):
        return sorted(v for ref in refs for v in ray.get(ref).column("id").to_pylist())

    refs = compat.block_refs(ds)
    assert rows(refs) == list(range(5)) and all(ray.get(ref).num_rows for ref in refs)
    assert len(refs) < 4  # the blocks the filter emptied are left out
    monkeypatch.setenv("CHATFORGE_COMPAT_DISABLE", "block_refs")
    assert rows(compat.block_refs(ds)) == list(range(5))
