"""A curation's output without Ray: the accounting checks, and outputs that are replaced whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.config import load_spec
from chatforge.data import pipeline
from chatforge.data.pipeline import AccountingError, block_stats, check_accounting, merge_stats, move_into_place
from chatforge.data.sources import ReadCounts


def stats_of(kept: int, dropped: int, augmented: int = 0, augmented_dropped: int = 0) -> dict:
    rows = [{"drop_reason": None, "split": "train"}] * kept + [{"drop_reason": "x"}] * dropped
    rows += [{"drop_reason": None, "augmented": True, "split": "train"}] * augmented
    rows += [{"drop_reason": "x", "augmented": True}] * augmented_dropped
    return merge_stats([json.loads(json.dumps(block_stats(rows)))])


def test_accounting_that_adds_up_passes():
    stats = stats_of(kept=5, dropped=3, augmented=2, augmented_dropped=1)
    assert (stats["input_records"], stats["augmented"], stats["augmented_dropped"]) == (8, 2, 1)
    check_accounting(8, [], stats, data_rows=7, dropped_rows=4)


@pytest.mark.parametrize(
    ("read_records", "unreported", "data_rows", "dropped_rows", "message"),
    [
        (9, [], 7, 4, "the readers emitted 9 records but 8 reached the write (kept 5 + dropped 3)"),
        (8, ["a.jsonl bytes 0-10"], 7, 4, "1 read tasks never reported a count: a.jsonl bytes 0-10"),
        (8, [], 6, 4, "6 rows in data/ but the pass counted 5 kept + 2 augmented"),
        (8, [], 7, 3, "3 rows in dropped/ but the pass counted 3 dropped + 1 dropped slices"),
    ],
)
def test_accounting_that_does_not_add_up_names_both_counts(read_records, unreported, data_rows, dropped_rows, message):
    stats = stats_of(kept=5, dropped=3, augmented=2, augmented_dropped=1)
    with pytest.raises(AccountingError) as caught:
        check_accounting(read_records, unreported, stats, data_rows, dropped_rows)
    assert str(caught.value) == f"accounting mismatch: {message}"


def write_output(root, tag: str, kept: int = 2, dropped: int = 1) -> None:
    """An output dir as a run leaves it: data/<split>/, dropped/, manifest.json (rows say which run wrote them)."""
    for directory, n in ((root / "data" / "train", kept), (root / "dropped", dropped)):
        directory.mkdir(parents=True)
        pq.write_table(pa.table({"run": [tag] * n}), directory / "part.parquet")
    (root / "manifest.json").write_text(json.dumps({"run": tag}))


def runs_in(root) -> set[str]:
    found = set(pq.ParquetDataset(str(root / "data")).read()["run"].to_pylist())
    return found | {json.loads((root / "manifest.json").read_text())["run"]}


def test_move_into_place_replaces_the_outputs_and_keeps_other_files(tmp_path):
    output = tmp_path / "out"
    write_output(output, "old")
    (output / "notes.txt").write_text("mine")
    staging = tmp_path / ".out.staging-1"
    write_output(staging, "new")
    move_into_place(str(staging), str(output))
    assert runs_in(output) == {"new"} and (output / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(output)) == ["data", "dropped", "manifest.json", "notes.txt"]


def test_a_move_that_fails_part_way_puts_the_previous_output_back(tmp_path, monkeypatch):
    output = tmp_path / "out"
    write_output(output, "old")
    staging = tmp_path / ".out.staging-1"
    write_output(staging, "new")
    real_move, calls = pipeline.shutil.move, []

    def failing_move(src, dst):
        calls.append(src)
        if len(calls) == 5:  # the three old entries are out, "dropped" is in: "data" fails (a full disk, say)
            raise OSError(28, "No space left on device")
        return real_move(src, dst)

    monkeypatch.setattr(pipeline.shutil, "move", failing_move)
    with pytest.raises(OSError, match="No space left"):
        move_into_place(str(staging), str(output))
    monkeypatch.setattr(pipeline.shutil, "move", real_move)
    assert runs_in(output) == {"old"}
    assert sorted(os.listdir(output)) == ["data", "dropped", "manifest.json"]


@pytest.fixture
def spec(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"messages": []}\n')
    return load_spec(
        None, [f"curate.output={tmp_path / 'out'}", f"curate.sources=[{{name: s, format: openai, path: '{source}'}}]"]
    )


def fake_run(stats: dict, read_records: int):
    """A `_write_staged` that writes a run's outputs (2 kept rows, 1 dropped) without Ray."""

    def write_staged(curate, staging, datasets=()):
        write_output(Path(staging), "new")
        counts = ReadCounts(os.path.join(staging, ".read-counts"), {"task": "in.jsonl"})
        os.makedirs(counts.directory)
        Path(counts.directory, "task.json").write_text(json.dumps({"records": read_records}))  # as the task reports
        return stats, counts

    return write_staged


def test_a_run_whose_counts_do_not_add_up_leaves_the_previous_output(spec, tmp_path, monkeypatch):
    write_output(tmp_path / "out", "old")
    monkeypatch.setattr(pipeline, "_write_staged", fake_run(stats_of(kept=2, dropped=1), read_records=4))
    with pytest.raises(AccountingError, match="the readers emitted 4 records but 3 reached the write"):
        pipeline.run_curation(spec)
    assert runs_in(tmp_path / "out") == {"old"}
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]  # nothing staged is left behind


def test_a_run_that_fails_midway_leaves_the_previous_output(spec, tmp_path, monkeypatch):
    write_output(tmp_path / "out", "old")

    def crash(curate, staging, datasets=()):
        write_output(Path(staging), "half")
        raise RuntimeError("a worker died")

    monkeypatch.setattr(pipeline, "_write_staged", crash)
    with pytest.raises(RuntimeError, match="a worker died"):
        pipeline.run_curation(spec)
    assert runs_in(tmp_path / "out") == {"old"}
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]


def test_a_run_that_adds_up_replaces_the_output(spec, tmp_path, monkeypatch):
    write_output(tmp_path / "out", "old")
    monkeypatch.setattr(pipeline, "_write_staged", fake_run(stats_of(kept=2, dropped=1), read_records=3))
    manifest = pipeline.run_curation(spec).manifest
    assert (manifest["input_records"], manifest["rows_written"], manifest["dropped_rows_written"]) == (3, 2, 1)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["input_records"] == 3
    assert set(pq.ParquetDataset(str(tmp_path / "out" / "data")).read()["run"].to_pylist()) == {"new"}
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]
