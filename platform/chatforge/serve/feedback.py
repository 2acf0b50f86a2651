"""The feedback store: every served completion and the ratings users give it, in one SQL database.

SQLAlchemy Core over any URL it knows: SQLite (the default, one node) or PostgreSQL (``postgresql+psycopg://``,
several replicas on several nodes). Prompts, answers and corrections are PII-scrubbed before they are written.
Methods are synchronous and thread-safe (a connection pool); the app calls them with ``asyncio.to_thread``.
``read_feedback`` reads the store back as a Ray Dataset for continual learning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from chatforge.config import FeedbackSpec
from chatforge.data.pii import scrub_text

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

# How long a SQLite writer waits for another's lock before failing; writes are short, so this is ample.
SQLITE_BUSY_TIMEOUT_MS = 30_000
RATINGS = (-1, 0, 1)
_SCHEMA_LOCK_KEY = 0x63686174666F7267  # "chatforg": the advisory lock that serialises table creation
GUARD_OUTCOMES = ("pass", "flagged", "blocked")

metadata = sa.MetaData()

completions = sa.Table(
    "completions",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("created", sa.Double, nullable=False, index=True),  # unix seconds
    sa.Column("variant", sa.String(64), nullable=False),
    sa.Column("user", sa.Text),
    sa.Column("prompt", sa.Text, nullable=False),  # JSON list of {"role", "content"}
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("guard", sa.String(16), nullable=False),
    sa.Column("guard_score", sa.Double),
    sa.Column("stream", sa.Boolean, nullable=False),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("completion_id", sa.String(128), sa.ForeignKey("completions.id"), nullable=False, index=True),
    sa.Column("rating", sa.SmallInteger, nullable=False),
    sa.Column("correction", sa.Text),
    sa.Column("comment", sa.Text),
    sa.Column("user", sa.Text),
    sa.Column("created", sa.Double, nullable=False, index=True),
    sa.CheckConstraint("rating BETWEEN -1 AND 1", name="feedback_rating_range"),
)


class UnknownCompletion(KeyError):
    """Feedback names a completion id the store has never seen."""


@dataclass(frozen=True)
class CompletionRecord:
    id: str
    created: float
    variant: str
    user: str | None
    prompt: str  # JSON of the request's messages
    answer: str
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    guard: str  # "pass" | "flagged" | "blocked"
    guard_score: float | None
    stream: bool


def safe_url(url: str | URL) -> str:
    """The URL as it may appear in logs and errors: the password masked."""
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):  # URI form: leave it to sqlite
        return None
    return Path(url.database)


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url``; for SQLite: parent dir created, WAL, busy timeout, enforced foreign keys."""
    url = make_url(url)
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, pool_pre_ping=url.get_backend_name() != "sqlite")
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Take transaction control from pysqlite (SQLAlchemy's documented recipe) so we can BEGIN IMMEDIATE below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # IMMEDIATE takes the write lock up front, waiting up to busy_timeout: a deferred transaction that reads
        # then writes fails at once with SQLITE_BUSY when another writer committed in between (WAL snapshots).
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _scrub_messages(prompt: str, placeholders: dict[str, str]) -> str:
    """Scrub each message's content of a JSON prompt; text that is not such JSON is scrubbed as a whole."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        messages = None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return scrub_text(prompt, placeholders=placeholders)[0]
    scrubbed = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            message = {**message, "content": scrub_text(content, placeholders=placeholders)[0]}
        scrubbed.append(message)
    return json.dumps(scrubbed, ensure_ascii=False)


class FeedbackStore:
    def __init__(self, url: str, scrub_pii: bool = True) -> None:
        self.url = url
        self.scrub_pii = scrub_pii
        self.engine = make_engine(url)
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # replicas starting together would race to create the same tables: one at a time
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            metadata.create_all(connection)
        logger.info("feedback store at %s", safe_url(url))

    @classmethod
    def from_spec(cls, spec: FeedbackSpec) -> FeedbackStore:
        """The store the spec names; the env var ``spec.url_env``, when set and not empty, replaces ``spec.url``."""
        url = (os.environ.get(spec.url_env) if spec.url_env else None) or spec.url
        return cls(url, scrub_pii=spec.scrub_pii)

    def _scrub(self, text: str | None, placeholders: dict[str, str]) -> str | None:
        if text is None or not self.scrub_pii:
            return text
        return scrub_text(text, placeholders=placeholders)[0]

    def record_completion(self, record: CompletionRecord) -> None:
        if record.guard not in GUARD_OUTCOMES:
            raise ValueError(f"guard must be one of {GUARD_OUTCOMES}, got {record.guard!r}")
        row = asdict(record)
        if self.scrub_pii:
            placeholders: dict[str, str] = {}  # one numbering across the conversation and its answer
            row["prompt"] = _scrub_messages(record.prompt, placeholders)
            row["answer"] = self._scrub(record.answer, placeholders)
        with self.engine.begin() as connection:
            connection.execute(completions.insert().values(**row))

    def record_feedback(
        self,
        completion_id: str,
        rating: int,
        correction: str | None,
        comment: str | None,
        user: str | None = None,
    ) -> int:
        """Store one rating of a completion; returns the feedback id. Raises UnknownCompletion, ValueError."""
        if isinstance(rating, bool) or rating not in RATINGS:
            raise ValueError(f"rating must be -1, 0 or 1, got {rating!r}")
        placeholders: dict[str, str] = {}
        row = {
            "completion_id": completion_id,
            "rating": int(rating),
            "correction": self._scrub(correction, placeholders),
            "comment": self._scrub(comment, placeholders),
            "user": user,
            "created": time.time(),
        }
        with self.engine.begin() as connection:
            known = connection.execute(sa.select(completions.c.id).where(completions.c.id == completion_id)).first()
            if known is None:
                raise UnknownCompletion(completion_id)
            result = connection.execute(feedback.insert().values(**row))
            return int(result.inserted_primary_key[0])

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            return {
                "completions": connection.execute(sa.select(sa.func.count()).select_from(completions)).scalar_one(),
                "feedback": connection.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one(),
            }

    def dispose(self) -> None:
        self.engine.dispose()


# ---------------------------------------------------------------- reading back with Ray Data


class _DbapiConnection:
    """A picklable ``connection_factory`` for ``ray.data.read_sql``: a DB-API connection to ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self):
        url = make_url(self.url)
        engine = sa.create_engine(url, poolclass=NullPool)
        if url.get_backend_name() == "sqlite":
            _configure_sqlite(engine)
        # A pool-proxied DB-API connection: with NullPool, close() closes the real connection.
        return engine.raw_connection()

    def __repr__(self) -> str:  # Ray may print the factory; never with the password
        return f"_DbapiConnection({safe_url(self.url)!r})"


def feedback_query(dialect: sa.Dialect, since: float | None = None) -> str:
    """SQL of the completions left-joined with their feedback, as text for ``dialect``."""
    query = (
        sa.select(
            completions.c.id.label("completion_id"),
            completions.c.created.label("completion_created"),
            completions.c.variant,
            completions.c.user,
            completions.c.prompt,
            completions.c.answer,
            completions.c.latency_ms,
            completions.c.prompt_tokens,
            completions.c.completion_tokens,
            completions.c.guard,
            completions.c.guard_score,
            completions.c.stream,
            feedback.c.id.label("feedback_id"),
            feedback.c.rating,
            feedback.c.correction,
            feedback.c.comment,
            feedback.c.user.label("feedback_user"),
            feedback.c.created.label("feedback_created"),
        )
        .select_from(completions.outerjoin(feedback, feedback.c.completion_id == completions.c.id))
        .order_by(completions.c.created, completions.c.id, feedback.c.id)
    )
    if since is not None:
        since = float(since)
        query = query.where(sa.or_(completions.c.created >= since, feedback.c.created >= since))
    return str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def read_feedback(url: str, since: float | None = None) -> ray.data.Dataset:
    """The store as a Dataset: one row per completion and feedback (completions without feedback have null
    feedback columns). ``since`` (unix seconds) keeps rows whose completion or feedback is that new or newer.
    Columns: completion_id, completion_created, variant, user, prompt, answer, latency_ms, prompt_tokens,
    completion_tokens, guard, guard_score, stream (0/1 on SQLite), feedback_id, rating, correction, comment,
    feedback_user, feedback_created.
    """
    import ray.data

    dialect = make_url(url).get_dialect()()
    return ray.data.read_sql(feedback_query(dialect, since), _DbapiConnection(url))
