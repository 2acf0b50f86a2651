"""`chatforge loop`'s parts that need no Ray: abandoning a cycle, the loop spec, the training mix, the JSONL files,
and a cycle that ends (or fails) before it reads any feedback, on a real SQLite feedback store."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from chatforge.cli import app
from chatforge.config import SpecError, TrainDataSpec, load_spec
from chatforge.continual.cycle import (
    LoopInputError,
    add_empty_val_split,
    candidate,
    open_store,
    review_line,
    run_cycle,
    training_data,
    training_line,
    write_jsonl,
)
from chatforge.continual.select import add_disagreement
from chatforge.continual.watermark import CycleConflict, abandon_cycle, commit_cycle, cycles, open_cycle
from chatforge.data.formats import parse_record
from chatforge.data.schema import MESSAGE_TYPE
from chatforge.serve.feedback import CompletionRecord, FeedbackStore


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}", scrub_pii=False)
    yield s
    s.dispose()


def rate(store: FeedbackStore, n: int, start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + n):
        prompt = json.dumps([{"role": "user", "content": f"question {i}"}])
        store.record_completion(
            CompletionRecord(f"c{i}", time.time(), "prod", None, prompt, f"answer {i}", 1.0, 3, 2, "pass", 0.0, False)
        )
        ids.append(store.record_feedback(f"c{i}", 1, None, None))
    return ids


def loop_spec(store: FeedbackStore, *overrides: str):
    return load_spec(None, [f"serve.feedback.url={store.url}", "serve.feedback.url_env=null", *overrides])


# ---------------------------------------------------------------- the watermark


def test_an_abandoned_cycle_gives_its_number_and_rows_to_the_next(store):
    rate(store, 3)
    cycle = open_cycle(store, settle_s=0)
    abandon_cycle(store, cycle)
    assert cycles(store) == []
    with pytest.raises(CycleConflict):
        abandon_cycle(store, cycle)  # no longer open
    rate(store, 2, start=3)
    again = open_cycle(store, settle_s=0)
    assert not again.reopened and (again.number, again.after_feedback_id, again.upto_feedback_id) == (1, 0, 5)
    commit_cycle(store, again, {"rows": 5})
    with pytest.raises(CycleConflict):
        abandon_cycle(store, again)  # a committed cycle stays committed
    assert [c["record"] for c in cycles(store)] == [{"rows": 5}]


# ---------------------------------------------------------------- the spec


def test_the_loop_spec_has_defaults_and_rejects_bad_keys_and_ratios(tmp_path):
    loop = load_spec(None).loop
    assert (loop.output, loop.deployed_model, loop.replay_ratio, loop.replay_data) == ("runs/loop", None, 0.5, [])
    path = tmp_path / "spec.yaml"
    path.write_text("loop:\n  replay_ration: 0.3\n")
    with pytest.raises(SpecError, match=r"loop\.replay_ration: unknown key") as err:
        load_spec(path)
    assert str(path) in str(err.value)
    for ratio in ("1", "1.5", "-0.1"):
        with pytest.raises(SpecError, match=r"loop\.replay_ratio"):
            load_spec(None, [f"loop.replay_ratio={ratio}"])
    with pytest.raises(SpecError, match=r"loop\.min_train_conversations"):
        load_spec(None, ["loop.min_train_conversations=0"])


def test_the_continual_pipeline_names_the_quickstart_model_data_and_store():
    spec = load_spec("pipelines/continual.yaml")
    assert spec.loop.deployed_model == "runs/quickstart/train/model"
    assert spec.loop.replay_data == ["runs/quickstart/curated/data"]
    assert spec.serve.feedback.url == "sqlite:///runs/serve/feedback.db"


# ---------------------------------------------------------------- the training mix


def test_the_feedback_and_the_replay_share_the_training_rows_by_the_ratio():
    replay = [TrainDataSpec(path="/a", weight=1.0, tag="chat"), TrainDataSpec(path="/b", weight=3.0)]
    data = training_data("/feedback", replay, 0.4)
    assert [(d.path, d.tag) for d in data] == [("/feedback", None), ("/a", "chat"), ("/b", None)]
    assert [d.weight for d in data] == pytest.approx([0.6, 0.1, 0.3])
    assert sum(d.weight for d in data) == pytest.approx(1.0)
    assert training_data("/feedback", replay, 0.0) == [TrainDataSpec(path="/feedback", weight=1.0)]


# ---------------------------------------------------------------- the files


def feedback_row(feedback_id: int, rating: int, correction: str | None = None, variant: str = "prod") -> dict:
    return {
        "feedback_id": feedback_id,
        "completion_id": f"c{feedback_id}",
        "variant": variant,
        "rating": rating,
        "guard": "pass",
        "prompt": json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]),
        "answer": "Lyon.",
        "correction": correction,
    }


def test_a_training_line_reads_back_through_the_curation_openai_reader_as_the_conversation(tmp_path):
    row = candidate(feedback_row(7, -1, correction="Paris."))
    path = tmp_path / "feedback.jsonl"
    write_jsonl(str(path), [training_line(row)])
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["id"] == "7"
    record = parse_record({"raw": line, "format": "openai", "origin": "feedback.jsonl#0", "source": "feedback"}, {})
    assert record["id"] == "feedback:7" == row["id"]  # the same id as the conversation's, once curated
    assert record["messages"] == row["messages"] and record["messages"][-1]["content"] == "Paris."
    meta = json.loads(record["meta"])
    assert (meta["kind"], meta["feedback_id"], meta["answer"], meta["variant"]) == ("correction", 7, "Lyon.", "prod")


def test_a_review_line_holds_the_model_answer_and_why_it_is_queued(tmp_path):
    rows = add_disagreement([candidate(feedback_row(1, -1)), candidate(feedback_row(2, 1, variant="canary"))])
    path = tmp_path / "review.jsonl"
    write_jsonl(str(path), [review_line(rows[0])])
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert (line["id"], line["kind"], line["rating"], line["disagreement"]) == ("feedback:1", "disliked", -1, 1.0)
    assert line["messages"][-1] == {"role": "assistant", "content": "Lyon."}
    write_jsonl(str(path), [])
    assert path.read_text() == ""
    assert [p.name for p in tmp_path.iterdir()] == ["review.jsonl"]  # written whole: no temporary file left


def test_curated_feedback_without_a_val_split_gets_an_empty_one(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    table = pa.table(
        {"id": ["feedback:1"], "messages": pa.array([[{"role": "user", "content": "hi"}]], pa.list_(MESSAGE_TYPE))}
    )
    pq.write_table(table, data / "train" / "part.parquet")
    assert add_empty_val_split(str(data))
    (val,) = (data / "val").iterdir()
    assert pq.read_table(val).num_rows == 0 and pq.read_schema(val) == table.schema
    assert not add_empty_val_split(str(data))  # there is one now: left alone


# ---------------------------------------------------------------- cycles that end before reading (no Ray)


def test_a_cycle_without_new_feedback_is_abandoned(store, tmp_path):
    result = run_cycle(loop_spec(store, f"loop.deployed_model={tmp_path / 'model'}", "loop.settle_s=0"))
    assert (result.status, result.cycle.number, result.output) == ("no_new_feedback", 1, None)
    assert cycles(store) == []


def test_a_cycle_that_fails_after_opening_stays_open_and_reopens_with_the_same_range(store, tmp_path):
    with pytest.raises(LoopInputError, match="loop.deployed_model is not set"):
        run_cycle(loop_spec(store))
    assert cycles(store) == []  # checked before the cycle opens
    rate(store, 4)
    spec = loop_spec(store, f"loop.deployed_model={tmp_path / 'missing'}", "loop.settle_s=0")
    with pytest.raises(LoopInputError, match=r"loop\.deployed_model '.*missing': no model here"):
        run_cycle(spec)
    (open_one,) = cycles(store)
    assert open_one["committed"] is None and (open_one["after_feedback_id"], open_one["upto_feedback_id"]) == (0, 4)
    rate(store, 2, start=4)
    again = open_cycle(store, settle_s=0)
    assert again.reopened and (again.number, again.after_feedback_id, again.upto_feedback_id) == (1, 0, 4)


def test_an_unreachable_store_names_the_key(tmp_path):
    (tmp_path / "file").write_text("")
    spec = load_spec(None, [f"serve.feedback.url=sqlite:///{tmp_path / 'file' / 'feedback.db'}"])
    with pytest.raises(LoopInputError, match=r"serve\.feedback\.url \(or the env var CHATFORGE_FEEDBACK_URL\)"):
        open_store(spec)


def test_the_command_fails_in_one_line_before_ray_without_a_deployed_model(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("loop:\n  replay_data: []\n")
    result = CliRunner().invoke(app, ["loop", str(spec)])
    assert result.exit_code == 2
    assert "error: loop.deployed_model is not set" in result.stderr and "Traceback" not in result.stderr
    result = CliRunner().invoke(app, ["loop", str(spec), f"loop.deployed_model={tmp_path / 'nope'}"])
    assert result.exit_code == 2 and "no model here" in result.stderr


def test_the_operator_abandons_an_open_cycle_and_its_rows_go_to_the_next(store, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: ops\n")
    at_store = [f"serve.feedback.url={store.url}", "serve.feedback.url_env=null"]
    nothing = CliRunner().invoke(app, ["loop", str(spec), *at_store, "--abandon"])
    assert nothing.exit_code == 0 and "no open cycle" in nothing.stderr
    ids = rate(store, 3)
    stuck = open_cycle(store, settle_s=0)  # a run that failed part way leaves it open
    result = CliRunner().invoke(app, ["loop", str(spec), *at_store, "--abandon"])
    assert result.exit_code == 0, result.stderr
    assert f"abandoned cycle {stuck.number}: feedback ids 1 to {max(ids)}" in " ".join(result.stderr.split())
    assert cycles(store) == []
    rate(store, 2, start=3)
    after = open_cycle(store, settle_s=0)
    assert (after.number, after.after_feedback_id, after.upto_feedback_id) == (stuck.number, 0, max(ids) + 2)
