"""`run_cycle` on a 2-CPU Ray: a SQLite feedback store holding 40 rated completions, a tiny deployed model trained
for a few steps, one whole cycle (read, select, curate, fine-tune with replay, eval gate, commit); then a cycle with
nothing new, and a cycle that fails after opening and is reopened with the same feedback ids by the next run."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.cli.loop import track_cycle
from chatforge.config import load_spec
from chatforge.continual.cycle import LoopInputError, run_cycle
from chatforge.continual.watermark import cycles
from chatforge.data.schema import MESSAGE_TYPE
from chatforge.serve.feedback import CompletionRecord, FeedbackStore
from chatforge.tracking import command_run
from chatforge.train.trainer import run_training
from helpers.corpus import conversation, sentence
from helpers.train_data import TINY_TRAINING, write_curated

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY_EVAL = [
    "eval.max_new_tokens=8",
    "eval.max_prompts=4",
    "eval.bias_axes=[age]",
    "eval.max_bias_templates=1",
    "eval.samples=1",
    "eval.top_logprobs=3",
    "eval.attribution_max_tokens=4",
    "curate.condition.max_new_tokens=8",
]
# What the 40 rated completions are, in order, and what each becomes (continual.build).
PLAN = (
    [("liked", "prod", 1, None)] * 16
    + [("correction", "canary", -1, "fix")] * 8
    + [("disliked", "canary", -1, None)] * 8  # the first 4 answer the prompts of the last 4 liked ones
    + [("guarded", "prod", 1, None)] * 4
    + [("neutral", "prod", 0, None)] * 4
)
SHARED_PROMPTS = 4
FIRST_SHARED = 12  # the liked completions whose prompts the canary answered too: PLAN[12:16]


def add_completion(store: FeedbackStore, number: int, prompt: list[dict], variant: str, answer: str, guard: str):
    store.record_completion(
        CompletionRecord(
            f"c{number}", time.time(), variant, None, json.dumps(prompt), answer, 5.0, 10, 8, guard, 0.1, False
        )
    )


def fill_store(store: FeedbackStore, rng: random.Random) -> dict[int, dict]:
    """The PLAN's completions and ratings; returns each feedback id's plan entry, prompt and correction."""
    rows: dict[int, dict] = {}
    prompts: list[list[dict]] = []
    for number, (kind, variant, rating, correction) in enumerate(PLAN):
        disliked_index = number - 24
        if kind == "disliked" and disliked_index < SHARED_PROMPTS:
            prompt = prompts[FIRST_SHARED + disliked_index]
        elif number % 5 == 0:  # a few multi-turn conversations
            prompt = conversation(rng, turns=3, words=(4, 9))
        else:
            prompt = [{"role": "user", "content": sentence(rng, rng.randint(5, 10))}]
        prompts.append(prompt)
        guard = "flagged" if kind == "guarded" else "pass"
        add_completion(store, number, prompt, variant, sentence(rng, rng.randint(6, 12)), guard)
        text = sentence(rng, 8) if correction else None
        feedback_id = store.record_feedback(f"c{number}", rating, text, None)
        rows[feedback_id] = {"kind": kind, "prompt": prompt, "correction": text, "completion_id": f"c{number}"}
    return rows


def rate_more(store: FeedbackStore, rng: random.Random, n: int, start: int) -> list[int]:
    ids = []
    for number in range(start, start + n):
        add_completion(store, number, [{"role": "user", "content": sentence(rng, 6)}], "prod", sentence(rng, 8), "pass")
        ids.append(store.record_feedback(f"c{number}", 1, None, None))
    return ids


def write_test_split(data_dir: Path, n: int = 12) -> None:
    rng = random.Random(5)
    (data_dir / "test").mkdir()
    messages = [conversation(rng, turns=2, words=(4, 9)) for _ in range(n)]
    pq.write_table(pa.table({"messages": pa.array(messages, pa.list_(MESSAGE_TYPE))}), data_dir / "test" / "p.parquet")


def cycle_spec(root: Path, store: FeedbackStore, model: str, replay: Path, *overrides: str):
    return load_spec(
        None,
        [
            *TINY_TRAINING,
            "model.max_length=128",
            "train.max_steps=6",
            "train.eval_every=3",
            *TINY_EVAL,
            "curate.split={train: 1.0, val: 0.0, test: 0.0}",  # every feedback conversation trains: no val/ at all
            f"serve.feedback.url={store.url}",
            "serve.feedback.url_env=null",
            f"loop.deployed_model={model}",
            f"loop.replay_data=['{replay}']",
            f"loop.output={root / 'loop'}",
            "loop.settle_s=0",
            "loop.review_size=10",
            "loop.train_size=20",
            "loop.replay_ratio=0.5",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def first_cycle(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    replay = write_curated(root / "replay", n_train=120, n_val=16, fingerprint="fp-replay")
    write_test_split(replay)
    deploy_spec = load_spec(
        None,
        [
            *TINY_TRAINING,
            "model.max_length=128",
            "train.max_steps=12",
            f"train.data=[{{path: '{replay}'}}]",
            f"train.output={root / 'deployed'}",
        ],
    )
    deployed = run_training(deploy_spec).summary["model_dir"]
    store = FeedbackStore(f"sqlite:///{root / 'feedback.db'}", scrub_pii=False)
    planned = fill_store(store, random.Random(11))
    spec = cycle_spec(root, store, deployed, replay)
    phases: list[str] = []
    with command_run(spec, "loop", output=spec.loop.output) as tracked:
        result = run_cycle(spec, progress=phases.append, tracked=tracked)
        track_cycle(tracked, result)
    yield {
        "result": result,
        "root": root,
        "store": store,
        "planned": planned,
        "deployed": deployed,
        "replay": replay,
        "phases": phases,
        "tracked": tracked,
    }
    store.dispose()


def test_the_cycle_counts_every_rating_by_what_it_became(first_cycle):
    result = first_cycle["result"]
    record = result.record
    assert result.status == "ok" and record["status"] == "ok"
    assert (result.cycle.number, result.cycle.reopened) == (1, False)
    assert record["feedback_ids"] == {"after": 0, "upto": 40}
    assert record["rows_read"] == 40
    assert record["uses"] == {"train": 24, "review": 12, "skip": 4}
    assert record["kinds"] == {"correction": 8, "disliked": 8, "guarded": 4, "liked": 16, "neutral": 4}
    assert record["selected"]["review"]["conversations"] == 10 and record["selected"]["train"]["conversations"] == 20
    phases = first_cycle["phases"]
    for phase in ("opening", "reading", "selecting", "curating", "fine-tuning", "evaluating", "committing"):
        assert any(phase in message for message in phases), (phase, phases)


def test_review_and_training_files_are_ranked_by_selection(first_cycle):
    result, planned = first_cycle["result"], first_cycle["planned"]
    output = Path(result.output)
    review = [json.loads(line) for line in (output / "review.jsonl").read_text().splitlines()]
    # lowest rating first (-1: disliked), then the deployed model's uncertainty of its answer, highest first
    assert [line["kind"] for line in review] == ["disliked"] * 8 + ["guarded"] * 2
    assert all(math.isfinite(line["uncertainty"]) and line["uncertainty"] > 0 for line in review)
    disliked = [line["uncertainty"] for line in review[:8]]
    assert disliked == sorted(disliked, reverse=True)
    # A/B disagreement is measured (their prompts were rated +1 by the other variant); it breaks uncertainty's ties
    assert sorted(line["disagreement"] for line in review[:8]) == [0.0] * 4 + [1.0] * SHARED_PROMPTS
    for line in review:
        assert planned[line["feedback_id"]]["kind"] == line["kind"]
        assert line["messages"][:-1] == planned[line["feedback_id"]]["prompt"]

    training = [json.loads(line) for line in (output / "feedback.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in training] == ["correction"] * 8 + ["liked"] * 12  # -1 ranks first; capped at 20
    curated = {row["id"]: row for row in pq.read_table(output / "feedback" / "data" / "train").to_pylist()}
    conditioned = 0
    for line in training:
        plan = planned[int(line["id"])]
        assert line["completion_id"] == plan["completion_id"]
        assert line["messages"][:-1] == plan["prompt"]  # as the users sent it
        if plan["correction"]:
            assert line["messages"][-1] == {"role": "assistant", "content": plan["correction"]}
        row = curated.get(f"feedback:{line['id']}")
        if row is None:
            continue  # dropped by a curation step
        # curated: the users' turns and the target as they were; earlier assistant turns regenerated by the deployed
        # model (the condition step), their originals kept in meta
        assert [t["role"] for t in row["messages"]] == [t["role"] for t in line["messages"]]
        assert [t for t in row["messages"] if t["role"] != "assistant"] == [
            t for t in line["messages"] if t["role"] != "assistant"
        ]
        assert row["messages"][-1] == line["messages"][-1]
        earlier = [i for i, t in enumerate(line["messages"][:-1]) if t["role"] == "assistant"]
        originals = json.loads(row["meta"]).get("conditioned_from", {})
        assert sorted(int(i) for i in originals) == earlier
        for i in earlier:
            assert originals[str(i)] == line["messages"][i]["content"] != row["messages"][i]["content"]
        assert row["conditioned"] == {"regenerated": len(earlier), "kept": 0}
        conditioned += bool(earlier)
    record = first_cycle["result"].record["conditioning"]
    assert conditioned > 0 and record["conversations"] == conditioned and record["kept_turns"] == 0
    # among equal ratings, the answers the deployed model was least sure of first
    for block in (training[:8], training[8:]):
        scores = [line["uncertainty"] for line in block]
        assert scores == sorted(scores, reverse=True)
    assert first_cycle["result"].record["uncertainty"]["scored"] == 40


def test_the_feedback_is_curated_and_trains_with_replay_from_the_deployed_model(first_cycle):
    record, replay = first_cycle["result"].record, first_cycle["replay"]
    output = Path(first_cycle["result"].output)
    curation = record["curation"]
    assert curation["input_records"] == 20
    assert curation["kept"] + sum(curation["dropped"].values()) == 20 and curation["kept"] >= 18
    assert curation["splits"] == {"train": curation["kept"]}
    manifest = json.loads((output / "feedback" / "manifest.json").read_text())
    assert manifest["fingerprint"] == curation["fingerprint"]
    assert pq.read_table(output / "feedback" / "data" / "val").num_rows == 0  # the empty val/ the trainer needs

    training = record["training"]
    assert [(d["path"], d["weight"]) for d in training["data"]] == [
        (str(output / "feedback" / "data"), 0.5),
        (str(replay), 0.5),
    ]
    assert training["steps"] == 6 and math.isfinite(training["eval_loss"])
    summary = json.loads((output / "train" / "training.json").read_text())
    assert summary["config"]["model"]["name_or_path"] == str(Path(first_cycle["deployed"]).resolve())
    assert summary["data_fingerprints"] == [curation["fingerprint"], "fp-replay"]
    shares = {Path(d["path"]).parent.name: d for d in summary["data"]["datasets"]}
    assert shares["feedback"]["conversations"] == curation["kept"]
    assert shares["feedback"]["sampled_fraction"] == 1.0 and shares["replay"]["sampled_fraction"] < 1.0
    assert (Path(record["candidate_model"]) / "config.json").is_file()


def test_the_candidate_is_gated_against_the_deployed_model(first_cycle):
    record = first_cycle["result"].record
    gate = record["eval"]["gate"]
    assert isinstance(gate["passed"], bool) and isinstance(gate["reasons"], list)
    evaluated = json.loads((Path(record["eval"]["output"]) / "eval.json").read_text())
    assert evaluated["gate"] == gate
    assert evaluated["baseline"]["model_dir"] == str(Path(first_cycle["deployed"]).resolve())
    assert evaluated["data_dir"] == str(Path(first_cycle["replay"]).resolve()) and evaluated["perplexity"] > 0
    assert record["deployment"] is None and record["deployed_model"] == evaluated["baseline"]["model_dir"]


def test_the_cycle_is_committed_with_its_record_and_tracked(first_cycle):
    result, store, tracked = first_cycle["result"], first_cycle["store"], first_cycle["tracked"]
    written = json.loads((Path(result.output) / "cycle.json").read_text())
    assert written == result.record
    (committed,) = cycles(store)
    assert committed["committed"] is not None and committed["record"] == written
    assert written["tracking"]["run_id"] == tracked.run_id
    run = mlflow.MlflowClient(tracked.uri).get_run(tracked.run_id)
    assert run.data.tags["chatforge.loop.cycle"] == "1" and run.data.tags["chatforge.loop.status"] == "ok"
    assert run.data.metrics["rows_read"] == 40 and run.data.metrics["conversations.train"] == 20


def test_then_nothing_new_and_a_failed_cycle_reopens_with_the_same_range(first_cycle):
    root, store = first_cycle["root"], first_cycle["store"]
    deployed, replay = first_cycle["deployed"], first_cycle["replay"]

    idle = run_cycle(cycle_spec(root, store, deployed, replay))
    assert (idle.status, idle.cycle.number, idle.output) == ("no_new_feedback", 2, None)
    assert len(cycles(store)) == 1  # abandoned: no open cycle left behind

    new_ids = rate_more(store, random.Random(12), 6, start=len(PLAN))
    with pytest.raises(LoopInputError, match="no model here"):
        run_cycle(cycle_spec(root, store, str(root / "no-such-model"), replay))
    failed = cycles(store)[-1]
    assert (failed["cycle"], failed["committed"]) == (2, None)
    assert (failed["after_feedback_id"], failed["upto_feedback_id"]) == (40, max(new_ids))

    rate_more(store, random.Random(13), 2, start=len(PLAN) + 6)  # arrives after the failure: not cycle 2's
    retried = run_cycle(cycle_spec(root, store, deployed, replay, "loop.min_train_conversations=1000"))
    assert retried.cycle.reopened and retried.cycle.number == 2
    assert (retried.cycle.after_feedback_id, retried.cycle.upto_feedback_id) == (40, max(new_ids))
    assert retried.status == "not_enough_feedback" and retried.record["rows_read"] == 6
    assert retried.record["uses"]["train"] == 6
    assert len(cycles(store)) == 1  # abandoned, so its rows (and the 2 newer ones) wait for the next cycle


def test_response_conditioning_regenerates_only_the_earlier_assistant_turns(first_cycle):
    from chatforge.config import ConditionSpec
    from chatforge.data.condition import ConditionActor

    def turn(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    single = [turn("user", "hello"), turn("assistant", "GOLD one")]
    multi = [
        turn("system", "Be brief."),
        turn("user", "hi"),
        turn("assistant", "HUMAN first"),
        turn("user", "and then?"),
        turn("assistant", "HUMAN second"),
        turn("user", "last one"),
        turn("assistant", "GOLD two"),
    ]
    too_long = [turn("user", "word " * 400), turn("assistant", "HUMAN"), turn("user", "?"), turn("assistant", "GOLD")]
    rows = [
        {"id": "t:single", "messages": single, "meta": "{}", "drop_reason": None},
        {"id": "t:multi", "messages": multi, "meta": '{"origin": "x"}', "drop_reason": None},
        {"id": "t:dropped", "messages": multi, "meta": "{}", "drop_reason": "toxic_user"},
        {"id": "t:long", "messages": too_long, "meta": "{}", "drop_reason": None},
    ]
    actor = ConditionActor(ConditionSpec(model=first_cycle["deployed"], temperature=0, max_new_tokens=6))
    out = actor(pa.Table.from_pylist(rows)).to_pylist()
    assert [row["conditioned"] for row in out] == [
        {"regenerated": 0, "kept": 0},
        {"regenerated": 2, "kept": 0},
        None,  # dropped rows pass through
        {"regenerated": 0, "kept": 1},  # past the model's window: the turn keeps its text
    ]
    assert out[0]["messages"] == single and out[2]["messages"] == multi and out[3]["messages"] == too_long
    conditioned = out[1]["messages"]
    assert [t["role"] for t in conditioned] == [t["role"] for t in multi]
    assert conditioned[-1] == turn("assistant", "GOLD two")  # the target is never regenerated
    assert [conditioned[i] for i in (0, 1, 3, 5)] == [multi[i] for i in (0, 1, 3, 5)]
    assert conditioned[2]["content"] != "HUMAN first" and conditioned[4]["content"] != "HUMAN second"
    assert json.loads(out[1]["meta"]) == {"origin": "x", "conditioned_from": {"2": "HUMAN first", "4": "HUMAN second"}}
    # greedy: the same model gives the same turns again, the second given the regenerated first
    again = actor(pa.Table.from_pylist(rows[1:2])).to_pylist()
    assert again[0]["messages"] == conditioned


def test_a_loop_killed_mid_cycle_loses_and_repeats_no_feedback_row(first_cycle, tmp_path):
    """`chatforge loop` SIGKILLed (with its Ray) while fine-tuning, then run again: the cycle is reopened with the
    same feedback ids and committed once, so every row belongs to exactly one committed cycle."""
    import os
    import signal
    import subprocess
    import sys

    root, store = first_cycle["root"], first_cycle["store"]
    deployed, replay = first_cycle["deployed"], first_cycle["replay"]
    rate_more(store, random.Random(14), 4, start=len(PLAN) + 8)  # with the 8 the earlier test left waiting
    committed_before = [c for c in cycles(store) if c["committed"]]
    spec_file = tmp_path / "loop.yaml"
    spec_file.write_text("name: killed\n")
    overrides = [
        *TINY_TRAINING,
        "model.max_length=128",
        "train.max_steps=200",  # long enough to be killed while fine-tuning
        "train.eval_every=100",
        *TINY_EVAL,
        "curate.split={train: 1.0, val: 0.0, test: 0.0}",
        f"serve.feedback.url={store.url}",
        "serve.feedback.url_env=null",
        f"loop.deployed_model={deployed}",
        f"loop.replay_data=['{replay}']",
        f"loop.output={root / 'loop'}",
        "loop.settle_s=0",
        "loop.condition_responses=false",
        "loop.uncertainty=false",
    ]
    argv = [sys.executable, "-m", "chatforge.cli", "loop", str(spec_file), *overrides]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    killed = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    curated = root / "loop" / "cycle-0002" / "feedback" / "manifest.json"  # curation done: fine-tuning is next
    deadline = time.monotonic() + 300
    while not curated.exists():
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the cycle did not finish curating in 300 s"
        time.sleep(0.5)
    time.sleep(5)  # into the fine-tuning
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    opened = cycles(store)[-1]
    assert (opened["cycle"], opened["committed"]) == (2, None)  # open, as the kill left it

    finished = subprocess.run([*argv, "train.max_steps=4"], env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    committed = [c for c in cycles(store) if c["committed"]]
    assert len(committed) == len(committed_before) + 1
    again = committed[-1]
    assert (again["cycle"], again["after_feedback_id"]) == (2, opened["after_feedback_id"])
    assert again["upto_feedback_id"] == opened["upto_feedback_id"] and again["record"]["reopened"]
    assert again["record"]["rows_read"] == 12  # 6 + 2 from the earlier test, 4 here: each once
    spans = [(c["after_feedback_id"], c["upto_feedback_id"]) for c in committed]
    covered = [i for after, upto in spans for i in range(after + 1, upto + 1)]
    assert sorted(covered) == list(range(1, max(covered) + 1))  # no id twice, none skipped
