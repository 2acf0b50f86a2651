"""The feedback store on SQLite and on a private PostgreSQL server, its background writer against a database
that is locked, down, or full of work, and the store read back through Ray Data."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
import time
import uuid

import pytest
import sqlalchemy as sa

from chatforge.config import FeedbackSpec
from chatforge.serve.feedback import (
    AlreadyRated,
    CompletionRecord,
    FeedbackStore,
    StoreBusy,
    StoreUnavailable,
    UnknownCompletion,
    hash_user,
    metadata,
    read_feedback,
    safe_url,
)
from chatforge.serve.metrics import ServeMetrics
from chatforge.serve.writer import StoreWriter

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
        metadata.drop_all(connection)  # every table of the store, the ones that reference completions first
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
        key_id="key-a",
    )
    fields.update(changes)
    return CompletionRecord(**fields)


def stored_rows(store: FeedbackStore, sql: str) -> list:
    with store.engine.connect() as connection:
        return connection.exec_driver_sql(sql).all()


def test_completions_and_feedback_join(store):
    first = make_record()
    second = make_record(variant="canary", stream=True, guard="flagged", guard_score=0.9, key_id="key-b")
    third = make_record(key_id=None)  # served without keys
    for record in (first, second, third):
        store.record_completion(record)
    up = store.record_feedback(first.id, 1, None, "great", user="user-7", key_id="key-a")
    down = store.record_feedback(third.id, -1, "Yeast releases CO2.", None)
    assert down > up
    assert store.counts() == {"completions": 3, "feedback": 2}
    rows = stored_rows(
        store,
        "SELECT c.id, c.variant, c.stream, c.key_id, f.rating, f.correction, f.key_id FROM completions c "
        "LEFT JOIN feedback f ON f.completion_id = c.id ORDER BY c.created, f.id",
    )
    assert [(r[0], r[1], bool(r[2]), r[3], r[4], r[5], r[6]) for r in rows] == [
        (first.id, "main", False, "key-a", 1, None, "key-a"),
        (second.id, "canary", True, "key-b", None, None, None),
        (third.id, "main", False, "", -1, "Yeast releases CO2.", ""),  # '' is the key id of anonymous serving
    ]


def test_one_rating_per_completion_and_only_from_the_key_that_asked(store):
    keyed, anonymous = make_record(key_id="key-a"), make_record(key_id=None)
    store.record_completion(keyed)
    store.record_completion(anonymous)
    store.record_feedback(keyed.id, 1, None, None, key_id="key-a")
    with pytest.raises(AlreadyRated):
        store.record_feedback(keyed.id, -1, "changed my mind", None, key_id="key-a")
    for other in ("key-b", None):  # another key, or none: as if the completion did not exist
        with pytest.raises(UnknownCompletion):
            store.record_feedback(keyed.id, 1, None, None, key_id=other)
    store.record_feedback(anonymous.id, 0, None, None, key_id=None)
    with pytest.raises(AlreadyRated):
        store.record_feedback(anonymous.id, 1, None, None, key_id=None)
    with pytest.raises(UnknownCompletion):
        store.record_feedback(anonymous.id, 1, None, None, key_id="key-a")
    assert store.check_rating(keyed.id, "key-a") == (True, True, True)
    assert store.check_rating(keyed.id, "key-b") == (True, False, False)
    assert store.check_rating("chatcmpl-never-served", "key-a") == (False, False, False)
    assert stored_rows(store, "SELECT rating, key_id FROM feedback ORDER BY id") == [(1, "key-a"), (0, "")]
    # the database holds the rule too, whoever writes
    with pytest.raises(sa.exc.IntegrityError), store.engine.begin() as connection:
        connection.exec_driver_sql(
            f"INSERT INTO feedback (completion_id, rating, created, key_id) VALUES ('{keyed.id}', 1, 0, 'key-a')"
        )


def test_user_is_stored_only_as_a_keyed_hash(store_url):
    key = b"s" * 32
    store = FeedbackStore(store_url, user_hash_key=key)
    record = make_record(user="jane.doe@example.com")
    store.record_completion(record)
    store.record_feedback(record.id, 1, None, None, user="jane.doe@example.com", key_id="key-a")
    stored = stored_rows(store, "SELECT c.user, f.user FROM completions c JOIN feedback f ON f.completion_id = c.id")
    store.dispose()
    assert stored == [(hash_user("jane.doe@example.com", key),) * 2]  # one user, one value, in both tables
    assert "jane" not in stored[0][0] and stored[0][0] != hash_user("jane.doe@example.com", b"x" * 32)


def test_unknown_completion_and_bad_rating(store):
    record = make_record()
    store.record_completion(record)
    with pytest.raises(UnknownCompletion):
        store.record_feedback("chatcmpl-never-served", 1, None, None, key_id="key-a")
    for rating in (2, -2, 5, True, 0.5):
        with pytest.raises(ValueError, match="rating must be"):
            store.record_feedback(record.id, rating, None, None, key_id="key-a")
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
    store.record_feedback(record.id, -1, "Say: contact bob@example.org instead", "my IP is 203.0.113.9", key_id="key-a")
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


def test_concurrent_ratings_of_one_completion_keep_exactly_one(store):
    """200 threads rate 10 completions, 20 each, with the completions' key: 10 stored, 190 AlreadyRated, nothing
    else (on PostgreSQL two transactions can both find no rating; the unique index decides)."""
    records = [make_record() for _ in range(10)]
    for record in records:
        store.record_completion(record)

    def rate(i: int) -> str:
        try:
            store.record_feedback(
                records[i % 10].id, (i % 3) - 1, f"correction {i}", None, user=f"u{i}", key_id="key-a"
            )
        except AlreadyRated:
            return "409"
        return "200"

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        outcomes = list(pool.map(rate, range(200)))
    assert (outcomes.count("200"), outcomes.count("409")) == (10, 190)
    assert store.counts() == {"completions": 10, "feedback": 10}
    per_completion = stored_rows(store, "SELECT completion_id, COUNT(*) FROM feedback GROUP BY completion_id")
    assert sorted(per_completion) == sorted((record.id, 1) for record in records)


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
    store.record_feedback(rated.id, -1, "better answer", "nice try", key_id="key-a")

    rows = read_feedback(store_url).take_all()
    assert len(rows) == 3  # one per completion and feedback; completions without feedback once, with nulls
    by_completion: dict[str, list] = {}
    for row in rows:
        by_completion.setdefault(row["completion_id"], []).append(row)
    assert [r["rating"] for r in by_completion[rated.id]] == [-1]
    assert [r["rating"] for r in by_completion[unrated.id]] == [None]
    assert by_completion[rated.id][0]["correction"] == "better answer"
    assert by_completion[rated.id][0]["feedback_id"] is not None and by_completion[rated.id][0]["key_id"] == "key-a"
    assert by_completion[old.id][0]["completion_created"] == pytest.approx(old.created)
    assert by_completion[rated.id][0]["prompt"] == rated.prompt and by_completion[rated.id][0]["variant"] == "main"

    recent = read_feedback(store_url, since=time.time() - 60).take_all()
    assert {r["completion_id"] for r in recent} == {rated.id, unrated.id}


# ---------------------------------------------------------------- a store made before ratings were tied to keys


def old_schema() -> sa.MetaData:
    """The tables as stores made before key ids had them: no key_id, no public_id, no unique index."""
    old = sa.MetaData()
    sa.Table(
        "completions",
        old,
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("created", sa.Double, nullable=False, index=True),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("user", sa.Text),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("latency_ms", sa.Double, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("guard", sa.String(16), nullable=False),
        sa.Column("guard_score", sa.Double),
        sa.Column("stream", sa.Boolean, nullable=False),
    )
    sa.Table(
        "feedback",
        old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("completion_id", sa.String(128), sa.ForeignKey("completions.id"), nullable=False, index=True),
        sa.Column("rating", sa.SmallInteger, nullable=False),
        sa.Column("correction", sa.Text),
        sa.Column("comment", sa.Text),
        sa.Column("user", sa.Text),
        sa.Column("created", sa.Double, nullable=False, index=True),
        sa.CheckConstraint("rating BETWEEN -1 AND 1", name="feedback_rating_range"),
    )
    return old


def test_an_older_store_gets_the_new_columns_and_keeps_its_rows(store_url, caplog):
    engine = sa.create_engine(store_url)
    if engine.dialect.name == "sqlite":
        engine.dispose()
        engine = sa.create_engine(store_url.replace("/nested/dir/", "/"))  # no parent dirs to make by hand
        store_url = str(engine.url)
    old = old_schema()
    old.create_all(engine)
    with engine.begin() as connection:  # a completion rated twice, as the old API allowed
        row = {**{k: v for k, v in vars(make_record(id="chatcmpl-old")).items() if k != "key_id"}, "user": "u-1"}
        connection.execute(old.tables["completions"].insert().values(**row))
        for rating in (1, -1):
            connection.execute(
                old.tables["feedback"].insert().values(completion_id="chatcmpl-old", rating=rating, created=1.0)
            )
    engine.dispose()

    with caplog.at_level(logging.WARNING, logger="chatforge.serve.feedback"):
        store = FeedbackStore(store_url)
        assert store.counts() == {"completions": 1, "feedback": 2}  # first use: the columns are added
    assert "added the columns completions.key_id, feedback.key_id, feedback.public_id" in caplog.text
    inspector = sa.inspect(store.engine)
    assert {"key_id"} <= {c["name"] for c in inspector.get_columns("completions")}
    assert {"key_id", "public_id"} <= {c["name"] for c in inspector.get_columns("feedback")}
    assert any(i["name"] == "feedback_once_per_key" and i["unique"] for i in inspector.get_indexes("feedback"))
    assert stored_rows(store, "SELECT rating, key_id FROM feedback ORDER BY id") == [(1, None), (-1, None)]
    with pytest.raises(UnknownCompletion):  # no key id: nobody can tell whose it was, so nobody rates it
        store.record_feedback("chatcmpl-old", 1, None, None, key_id=None)
    fresh = make_record()
    store.record_completion(fresh)
    store.record_feedback(fresh.id, 1, None, None, key_id="key-a", public_id="feedback-1")
    with pytest.raises(AlreadyRated):
        store.record_feedback(fresh.id, 1, None, None, key_id="key-a")
    assert store.counts() == {"completions": 2, "feedback": 3}
    store.dispose()
    again = FeedbackStore(store_url)  # a second start finds nothing to add
    with caplog.at_level(logging.WARNING, logger="chatforge.serve.feedback"):
        caplog.clear()
        assert again.counts() == {"completions": 2, "feedback": 3}
    assert "added the columns" not in caplog.text
    again.dispose()


# ---------------------------------------------------------------- the background writer


async def until(condition, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


def sqlite_rows(path, query: str, *params) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(query, params).fetchall()


def test_a_rating_right_after_its_completion_waits_for_no_write_while_the_database_is_locked(tmp_path):
    """A slow database (another process holds SQLite's write lock) delays no call: the rating is checked against
    the completions this writer queued; both land, in order, once the lock goes."""
    path = tmp_path / "feedback.db"

    async def scenario() -> tuple[str, list, list]:
        writer = StoreWriter(FeedbackStore(f"sqlite:///{path}"), ServeMetrics())
        writer.start()
        await until(lambda: writer.healthy, "the store answered")  # tables made, WAL on
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held until COMMIT
        record = make_record()
        assert writer.add_completion(record)
        public_id = await writer.rate(record.id, "key-a", -1, "Yeast makes CO2.", None, "user-7")
        with pytest.raises(AlreadyRated):
            await writer.rate(record.id, "key-a", 1, None, None, None)
        with pytest.raises(UnknownCompletion):
            await writer.rate(record.id, "key-b", 1, None, None, None)
        while_locked = sqlite_rows(path, "SELECT id FROM completions")  # WAL: readers pass the lock
        holder.execute("COMMIT")
        holder.close()
        await asyncio.wait_for(writer.queue.join(), 120)
        assert await writer.close(10) == 0
        return (
            public_id,
            while_locked,
            sqlite_rows(path, "SELECT completion_id, rating, key_id, public_id FROM feedback"),
        )

    public_id, while_locked, stored = asyncio.run(scenario())
    assert while_locked == []  # the answers above came while nothing could be written
    assert len(stored) == 1 and stored[0][1:] == (-1, "key-a", public_id)


def test_writes_queue_while_the_store_is_down_and_all_land_in_order_when_it_is_back(tmp_path, caplog):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the store's directory should be")  # the store cannot be opened
    url = f"sqlite:///{blocker}/feedback.db"
    records = [make_record(created=float(i)) for i in range(5)]

    async def scenario() -> tuple[dict, dict, str]:
        writer = StoreWriter(FeedbackStore(url), ServeMetrics(), retry_window_s=600)
        writer.start()
        for record in records:
            assert writer.add_completion(record)  # never waits, whatever the store does
        public_id = await writer.rate(records[0].id, "key-a", 1, None, "good", "user-7")
        with pytest.raises(AlreadyRated):
            await writer.rate(records[0].id, "key-a", 1, None, None, None)
        await until(lambda: writer.healthy is False, "the writer saw the store down")
        down = writer.health()
        blocker.unlink()  # the store comes back
        await asyncio.wait_for(writer.queue.join(), 120)
        up = writer.health()
        assert await writer.close(10) == 0
        return down, up, public_id

    with caplog.at_level(logging.WARNING, logger="chatforge.serve.feedback"):
        down, up, public_id = asyncio.run(scenario())
    assert down == {"status": "degraded", "queued": 6}  # 5 completions and a rating behind the first write
    assert up == {"status": "ok", "queued": 0}
    assert "is unavailable" in caplog.text and "attempt 1" in caplog.text and "is back" in caplog.text
    db = blocker / "feedback.db"
    assert sqlite_rows(db, "SELECT id FROM completions ORDER BY created") == [(r.id,) for r in records]
    assert sqlite_rows(db, "SELECT completion_id, public_id FROM feedback") == [(records[0].id, public_id)]


def test_a_write_failing_past_the_retry_window_is_dropped_and_said(tmp_path, caplog):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")

    async def scenario() -> dict:
        writer = StoreWriter(FeedbackStore(f"sqlite:///{blocker}/feedback.db"), ServeMetrics(), retry_window_s=0.2)
        writer.start()
        for record in (make_record(), make_record()):
            writer.add_completion(record)
        await asyncio.wait_for(writer.queue.join(), 120)
        return writer.health()

    with caplog.at_level(logging.ERROR, logger="chatforge.serve.feedback"):
        health = asyncio.run(scenario())
    assert health == {"status": "degraded", "queued": 0}
    dropped = [r.getMessage() for r in caplog.records if "is dropped" in r.getMessage()]
    assert len(dropped) == 3 and all("retry_window_s" in line for line in dropped)  # the schema probe and 2 writes


def test_a_full_queue_drops_completions_with_a_log_line_and_refuses_ratings(tmp_path, caplog):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")

    async def scenario() -> None:
        writer = StoreWriter(FeedbackStore(f"sqlite:///{blocker}/feedback.db"), ServeMetrics(), queue_size=3)
        first, second, third = make_record(), make_record(), make_record()
        # the first write (the schema) and two completions fill it; nothing awaits in between, so none is taken
        assert writer.add_completion(first) and writer.add_completion(second)
        assert not writer.add_completion(third)
        with pytest.raises(StoreBusy, match="Retry"):
            await writer.rate(first.id, "key-a", 1, None, None, None)
        with pytest.raises(StoreUnavailable):  # never queued, so the database is asked, and it is down
            await writer.rate(third.id, "key-a", 1, None, None, None)
        blocker.unlink()
        await asyncio.wait_for(writer.queue.join(), 120)
        await writer.rate(first.id, "key-a", 1, None, None, None)  # taken once there is room
        assert await writer.close(30) == 0

    with caplog.at_level(logging.ERROR, logger="chatforge.serve.feedback"):
        asyncio.run(scenario())
    assert "the completion" in caplog.text and "is not stored" in caplog.text
    db = blocker / "feedback.db"
    assert len(sqlite_rows(db, "SELECT id FROM completions")) == 2
    assert len(sqlite_rows(db, "SELECT id FROM feedback")) == 1


def test_close_writes_the_queue_or_says_what_it_could_not(tmp_path, caplog):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")

    async def scenario() -> int:
        writer = StoreWriter(FeedbackStore(f"sqlite:///{blocker}/feedback.db"), ServeMetrics())
        writer.start()
        writer.add_completion(make_record())
        return await writer.close(0.3)

    with caplog.at_level(logging.ERROR, logger="chatforge.serve.feedback"):
        assert asyncio.run(scenario()) == 2  # the schema write in progress and the completion
    assert "2 writes were not written before shutdown" in caplog.text

    path = tmp_path / "feedback.db"
    records = [make_record() for _ in range(20)]

    async def stopping_at_once() -> int:
        writer = StoreWriter(FeedbackStore(f"sqlite:///{path}"), ServeMetrics())
        for record in records:
            writer.add_completion(record)
        return await writer.close(60)  # as a replica that Serve stops right after these arrived

    assert asyncio.run(stopping_at_once()) == 0
    assert len(sqlite_rows(path, "SELECT id FROM completions")) == 20


def test_a_replica_looks_again_for_a_completion_another_replica_has_not_written_yet(tmp_path):
    path = tmp_path / "feedback.db"

    async def scenario() -> str:
        answering = StoreWriter(FeedbackStore(f"sqlite:///{path}"), ServeMetrics(), peers=True)
        alone = StoreWriter(FeedbackStore(f"sqlite:///{path}"), ServeMetrics(), peers=False)
        rating = StoreWriter(FeedbackStore(f"sqlite:///{path}"), ServeMetrics(), peers=True)
        for writer in (answering, alone, rating):
            writer.start()
            await until(lambda w=writer: w.healthy, "the store answered")
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the answering replica's write waits
        record = make_record()
        answering.add_completion(record)
        with pytest.raises(UnknownCompletion):  # one replica: a completion it never saw is unknown at once
            await alone.rate(record.id, "key-a", 1, None, None, None)
        late = asyncio.create_task(rating.rate(record.id, "key-a", 1, None, None, None))
        await asyncio.sleep(0.1)  # let the first look-ups miss (found later either way)
        holder.execute("COMMIT")
        holder.close()
        public_id = await late
        await asyncio.wait_for(rating.queue.join(), 120)
        for writer in (answering, alone, rating):
            await writer.close(10)
        return public_id

    public_id = asyncio.run(scenario())
    assert sqlite_rows(path, "SELECT public_id FROM feedback") == [(public_id,)]


@pytest.fixture
def late_postgres_url(postgres_url):
    """A database on the private PostgreSQL server that does not exist until the test creates it (and dropped
    after): connecting fails, as with a server that is down, and the test can bring it up."""
    name = f"chatforge_late_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(sa.engine.make_url(postgres_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    yield sa.engine.make_url(postgres_url).set(database=name).render_as_string(hide_password=False), admin, name
    with admin.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


def test_postgres_down_at_start_then_up_loses_nothing(late_postgres_url):
    url, admin, name = late_postgres_url
    records = [make_record(created=float(i)) for i in range(3)]

    async def scenario() -> tuple[dict, FeedbackStore]:
        store = FeedbackStore(url)  # connects to nothing
        writer = StoreWriter(store, ServeMetrics())
        writer.start()
        for record in records:
            writer.add_completion(record)
        await writer.rate(records[1].id, "key-a", 0, "A better answer.", None, None)
        await until(lambda: writer.healthy is False, "the writer saw the database missing")
        down = writer.health()
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        await asyncio.wait_for(writer.queue.join(), 120)
        assert writer.health() == {"status": "ok", "queued": 0}
        await writer.close(10)
        return down, store

    down, store = asyncio.run(scenario())
    assert down["status"] == "degraded" and down["queued"] == 4
    assert stored_rows(store, "SELECT id FROM completions ORDER BY created") == [(r.id,) for r in records]
    assert stored_rows(store, "SELECT completion_id, correction FROM feedback") == [(records[1].id, "A better answer.")]
    store.dispose()
