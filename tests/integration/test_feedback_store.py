"""The feedback store on SQLite and on a private PostgreSQL server, and read back through Ray Data."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
import uuid

import pytest
import sqlalchemy as sa

from chatforge.config import FeedbackSpec
from chatforge.serve.feedback import CompletionRecord, FeedbackStore, UnknownCompletion, read_feedback, safe_url

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/nested/dir/feedback.db"  # the parent dirs do not exist yet
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = sa.create_engine(url)  # each test starts from empty tables
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS feedback, completions")
    engine.dispose()


@pytest.fixture
def store(store_url):
    store = FeedbackStore(store_url)
    yield store
    store.dispose()


def make_record(text: str = "Bread rises because yeast makes gas.", **changes) -> CompletionRecord:
    fields = dict(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=time.time(),
        variant="main",
        user="user-7",
        prompt=json.dumps([{"role": "user", "content": "Why does bread rise?"}]),
        answer=text,
        latency_ms=123.5,
        prompt_tokens=9,
        completion_tokens=8,
        guard="pass",
        guard_score=0.01,
        stream=False,
    )
    fields.update(changes)
    return CompletionRecord(**fields)


def stored_rows(store: FeedbackStore, sql: str) -> list:
    with store.engine.connect() as connection:
        return connection.exec_driver_sql(sql).all()


def test_completions_and_feedback_join(store):
    first, second = make_record(), make_record(variant="canary", stream=True, guard="flagged", guard_score=0.9)
    store.record_completion(first)
    store.record_completion(second)
    up = store.record_feedback(first.id, 1, None, "great", user="user-7")
    down = store.record_feedback(first.id, -1, "Yeast releases CO2.", None)
    assert down > up
    assert store.counts() == {"completions": 2, "feedback": 2}
    rows = stored_rows(
        store,
        "SELECT c.id, c.variant, c.stream, f.rating, f.correction FROM completions c "
        "LEFT JOIN feedback f ON f.completion_id = c.id ORDER BY c.created, f.id",
    )
    assert [(r[0], r[1], bool(r[2]), r[3], r[4]) for r in rows] == [
        (first.id, "main", False, 1, None),
        (first.id, "main", False, -1, "Yeast releases CO2."),
        (second.id, "canary", True, None, None),
    ]


def test_unknown_completion_and_bad_rating(store):
    record = make_record()
    store.record_completion(record)
    with pytest.raises(UnknownCompletion):
        store.record_feedback("chatcmpl-never-served", 1, None, None)
    for rating in (2, -2, 5, True, 0.5):
        with pytest.raises(ValueError, match="rating must be"):
            store.record_feedback(record.id, rating, None, None)
    assert store.counts() == {"completions": 1, "feedback": 0}
    # the database refuses an out-of-range rating too, whoever writes it
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as connection:
        connection.exec_driver_sql(
            f"INSERT INTO feedback (completion_id, rating, created) VALUES ('{record.id}', 3, 0)"
        )
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO feedback (completion_id, rating, created) VALUES ('nope', 1, 0)")


def test_pii_is_scrubbed(store_url):
    store = FeedbackStore(store_url)
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Mail jane.doe@example.com or call +1 415 555 0199, my card 4111 1111 1111 1111"},
    ]
    record = make_record("I wrote to jane.doe@example.com for you.", prompt=json.dumps(prompt))
    store.record_completion(record)
    store.record_feedback(record.id, -1, "Say: contact bob@example.org instead", "my IP is 203.0.113.9")
    (stored_prompt, answer), *_ = stored_rows(store, "SELECT prompt, answer FROM completions")
    (correction, comment), *_ = stored_rows(store, "SELECT correction, comment FROM feedback")
    store.dispose()
    messages = json.loads(stored_prompt)  # still the JSON of the messages
    assert messages[0] == {"role": "system", "content": "Be brief."}
    user_text = messages[1]["content"]
    assert "jane.doe" not in user_text and "555" not in user_text and "4111" not in user_text
    assert "[EMAIL_1]" in user_text and "[PHONE_1]" in user_text and "[CARD_1]" in user_text
    assert answer == "I wrote to [EMAIL_1] for you."  # same person, same placeholder as in the prompt
    assert "bob@example.org" not in correction and "[EMAIL" in correction
    assert "203.0.113.9" not in comment

    raw = FeedbackStore(store_url, scrub_pii=False)
    kept = make_record("reach me at jane.doe@example.com")
    raw.record_completion(kept)
    assert stored_rows(raw, f"SELECT answer FROM completions WHERE id = '{kept.id}'")[0][0].endswith("example.com")
    raw.dispose()


def test_concurrent_feedback_all_stored(store):
    records = [make_record() for _ in range(10)]
    for record in records:
        store.record_completion(record)

    def rate(i: int) -> int:
        return store.record_feedback(records[i % 10].id, (i % 3) - 1, f"correction {i}", None, user=f"u{i}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        ids = list(pool.map(rate, range(200)))
    assert len(set(ids)) == 200
    assert store.counts() == {"completions": 10, "feedback": 200}
    per_rating = dict(stored_rows(store, "SELECT rating, COUNT(*) FROM feedback GROUP BY rating"))
    assert per_rating == {-1: 67, 0: 67, 1: 66}


def test_from_spec_env_wins_and_logs_hide_password(store_url, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("TEST_FEEDBACK_URL", store_url)
    spec = FeedbackSpec(url=f"sqlite:///{tmp_path}/unused.db", url_env="TEST_FEEDBACK_URL", scrub_pii=False)
    with caplog.at_level(logging.INFO, logger="chatforge.serve.feedback"):
        store = FeedbackStore.from_spec(spec)
    assert store.url == store_url and store.scrub_pii is False
    assert not (tmp_path / "unused.db").exists()
    store.dispose()
    password = sa.engine.make_url(store_url).password
    if password:
        assert password not in caplog.text and password not in safe_url(store_url)
        assert "***" in caplog.text
    monkeypatch.setenv("TEST_FEEDBACK_URL", "")  # empty means unset
    store = FeedbackStore.from_spec(spec)
    assert store.url == spec.url
    store.dispose()


def test_read_feedback_with_ray(store, store_url, ray_local):
    old = make_record(created=time.time() - 3600)
    rated, unrated = make_record(), make_record()
    for record in (old, rated, unrated):
        store.record_completion(record)
    store.record_feedback(rated.id, 1, None, "nice")
    store.record_feedback(rated.id, -1, "better answer", None)

    rows = read_feedback(store_url).take_all()
    assert len(rows) == 4  # one per completion and feedback; completions without feedback once, with nulls
    by_completion: dict[str, list] = {}
    for row in rows:
        by_completion.setdefault(row["completion_id"], []).append(row)
    assert sorted(r["rating"] for r in by_completion[rated.id]) == [-1, 1]
    assert [r["rating"] for r in by_completion[unrated.id]] == [None]
    assert by_completion[rated.id][1]["correction"] == "better answer"
    assert {r["feedback_id"] is not None for r in by_completion[rated.id]} == {True}
    assert by_completion[old.id][0]["completion_created"] == pytest.approx(old.created)
    assert by_completion[rated.id][0]["prompt"] == rated.prompt and by_completion[rated.id][0]["variant"] == "main"

    recent = read_feedback(store_url, since=time.time() - 60).take_all()
    assert {r["completion_id"] for r in recent} == {rated.id, unrated.id}
