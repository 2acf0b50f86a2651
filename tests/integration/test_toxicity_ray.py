"""ToxicityStep on a local Ray: map tasks or an actor pool, per backend, add the typed columns and mark the toxic rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from chatforge.config import ToxicitySpec
from chatforge.data.batches import records_to_table
from chatforge.data.schema import BASE_SCHEMA, STAGE_SECONDS_COLUMN
from chatforge.data.toxicity import TOXICITY_COLUMNS, ToxicityStep, pool_size
from chatforge.runtime import cluster_cpus
from helpers.tiny_detoxify import build_tiny_detoxify

pytestmark = pytest.mark.integration


def conversation(record_id: str, user: str, assistant: str, drop_reason: str | None = None) -> dict:
    return {
        "id": record_id,
        "source": "test",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        "meta": "{}",
        "raw": None,
        "drop_reason": drop_reason,
    }


def run_step(ray, records: list[dict], spec: ToxicitySpec) -> tuple[pa.Schema, dict[str, dict]]:
    # Several blocks and batches, so rows really travel through the tasks or the actor pool in pieces.
    ds = ray.data.from_arrow(records_to_table(records, BASE_SCHEMA)).repartition(3)
    tables = ray.get(ToxicityStep(spec)(ds).to_arrow_refs())
    schema = tables[0].schema
    assert all(t.schema == schema for t in tables)
    rows = [row for t in tables for row in t.to_pylist()]
    assert len(rows) == len(records)
    return schema, {row["id"]: row for row in rows}


def check_common(schema: pa.Schema, rows: dict[str, dict]) -> None:
    for name, dtype in TOXICITY_COLUMNS.items():
        assert schema.field(name).type == dtype
    assert sum(dict(r[STAGE_SECONDS_COLUMN] or []).get("toxicity", 0.0) for r in rows.values()) > 0
    earlier = rows["earlier"]
    assert earlier["drop_reason"] == "dedup"
    assert earlier["toxicity"] is None and earlier["toxicity_flag"] is False
    clean = rows["clean"]
    assert clean["drop_reason"] is None and clean["toxicity_flag"] is False
    assert [t["role"] for t in json.loads(clean["toxicity_turns"])] == ["user", "assistant"]
    assert rows["toxic-assistant"]["drop_reason"] == "toxic_assistant"
    assert rows["toxic-assistant"]["toxicity"] > clean["toxicity"]
    toxic_user = rows["toxic-user"]
    assert toxic_user["drop_reason"] is None and toxic_user["toxicity_flag"] is True
    assert toxic_user["toxicity_user"] > clean["toxicity_user"]


@pytest.mark.parametrize("compute", ["tasks", "actors"])
def test_profanity_backend(ray_local, compute):
    insult = "you are a fucking idiot, shut up"
    records = [
        conversation("clean", "what time is it?", "it is five o'clock, have a nice day"),
        conversation("toxic-assistant", "can you help me?", insult),
        conversation("toxic-user", insult, "I'm sorry you feel that way. How can I help?"),
        conversation("earlier", insult, insult, drop_reason="dedup"),
    ] + [conversation(f"filler-{i}", f"question {i}", f"answer number {i}") for i in range(6)]
    spec = ToxicitySpec(backend="profanity", batch_size=3, num_cpus=0.5, compute=compute)
    schema, rows = run_step(ray_local, records, spec)
    check_common(schema, rows)
    assert sum(r["drop_reason"] is None for r in rows.values()) == 8


def test_detoxify_backend_on_a_tiny_checkpoint(ray_local, tmp_path):
    checkpoint, config_dir = build_tiny_detoxify(tmp_path)
    records = [
        conversation("clean", "could you please tell me the time ?", "have a nice day"),
        conversation("toxic-assistant", "hello friend", "shut up you worthless moron"),
        conversation("toxic-user", "you stupid pathetic fool", "thank you for your help"),
        conversation("earlier", "idiot", "idiot", drop_reason="dedup"),
    ]
    spec = ToxicitySpec(
        backend="detoxify",
        checkpoint=str(checkpoint),
        huggingface_config_path=str(config_dir),
        batch_size=2,
        num_cpus=1,
    )
    schema, rows = run_step(ray_local, records, spec)
    check_common(schema, rows)
    labels = json.loads(rows["clean"]["toxicity_turns"])[1]["scores"]
    assert set(labels) == {"toxicity", "insult"}


def test_the_pool_runs_apart_from_the_maps_before_it(ray_local):
    # Ray Data fuses a task map into a following actor pool whose resources match; then the map's work would run
    # inside the pool's one actor, batch after batch. On this 2-CPU Ray the actors reserve no CPU, so a map asking
    # for none either would match.
    records = [conversation(f"row-{i}", f"question {i}", f"answer {i}") for i in range(12)]
    ds = ray_local.data.from_arrow(records_to_table(records, BASE_SCHEMA)).repartition(3)
    ds = ds.map_batches(lambda table: table, batch_format="pyarrow", num_cpus=0)
    out = ToxicityStep(ToxicitySpec(backend="profanity", batch_size=4, compute="actors"))(ds).materialize()
    stats = out.stats()
    assert out.count() == len(records)
    assert "MapBatches(ToxicityActor)" in stats
    assert "->MapBatches(ToxicityActor)" not in stats


def test_the_pool_grows_to_one_scorer_per_cpu_unless_sized(ray_local):
    # ray_local has 2 CPUs: without `concurrency`, up to two scorers (one alone held back the benchmark's final pass).
    assert cluster_cpus() == 2
    assert pool_size(ToxicitySpec(), cluster_cpus()) == (1, 2)
    assert pool_size(ToxicitySpec(num_cpus=2), cluster_cpus()) == (1, 1)
    assert pool_size(ToxicitySpec(concurrency=3), cluster_cpus()) == (3, 3)

    def scorers_started() -> int:
        events = ray_local.timeline()
        return sum(e.get("cat") == "task::MapWorker(MapBatches(ToxicityActor)).__init__" for e in events)

    before = scorers_started()
    records = [conversation(f"row-{i}", f"question {i}", f"answer {i}") for i in range(40)]
    ds = ray_local.data.from_arrow(records_to_table(records, BASE_SCHEMA)).repartition(8)
    out = ToxicityStep(ToxicitySpec(backend="profanity", batch_size=5, compute="actors"))(ds).materialize()
    assert out.count() == len(records)
    assert scorers_started() - before == 2


def test_scoring_tasks_fuse_with_the_map_before_them_one_task_per_block(ray_local):
    # As tasks, scoring runs inside the map before it (dedup's staged-file reads in the pipeline), one task per
    # block of that map: scorer batches of `batch_size` rows must not make Ray Data bundle its blocks into one task.
    records = [conversation(f"row-{i}", f"question {i}", f"answer {i}") for i in range(12)]
    table = records_to_table(records, BASE_SCHEMA)
    ds = ray_local.data.from_items([{"part": i} for i in range(4)], override_num_blocks=4)
    ds = ds.map_batches(
        lambda batch: table.slice(3 * batch["part"][0].as_py(), 3), batch_size=1, batch_format="pyarrow"
    )
    out = ToxicityStep(ToxicitySpec(backend="profanity", batch_size=256))(ds).materialize()
    stats = out.stats()
    assert out.count() == len(records)
    assert "->MapBatches(score_table)" in stats
    fused = next(line for line in stats.splitlines() if "->MapBatches(score_table)" in line)
    assert "4 tasks executed" in fused
