"""The feedback store: every served completion and the ratings users give it, in one SQL database.

SQLAlchemy Core over any URL it knows: SQLite (the default: one node, one ingress replica) or PostgreSQL
(``postgresql+psycopg://``, several replicas on several nodes). Prompts, answers, corrections and comments are
PII-scrubbed, and ``user`` is hashed, before they are written. ``FeedbackStore``'s methods are synchronous and
thread-safe (a connection pool). No answer of the ingress waits for a write: `chatforge.serve.writer.StoreWriter`
writes for it from one background task, in arrival order, retrying while the database is slow or down.
``read_feedback`` reads the store back as a Ray Dataset for continual learning; ``loop_cycles`` holds the continual
loop's watermark (`chatforge.continual.watermark`); ``comparisons`` holds the human evaluation page's choices between
two answers to one prompt (`chatforge.serve.ui`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url
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
READ_ONLY_OPTION = "chatforge_read_only"  # an execution option: the transaction only reads
# The key id stored for completions and ratings served without API keys (a real key id is 12 hex characters).
ANONYMOUS_KEY_ID = ""

metadata = sa.MetaData()

completions = sa.Table(
    "completions",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("created", sa.Double, nullable=False, index=True),  # unix seconds
    sa.Column("variant", sa.String(64), nullable=False),
    sa.Column("user", sa.Text),  # hash_user of the request's `user`
    sa.Column("prompt", sa.Text, nullable=False),  # JSON list of {"role", "content"}
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("guard", sa.String(16), nullable=False),
    sa.Column("guard_score", sa.Double),
    sa.Column("stream", sa.Boolean, nullable=False),
    # the id of the API key that asked; ANONYMOUS_KEY_ID without keys; NULL in rows older than this column
    sa.Column("key_id", sa.String(64)),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("completion_id", sa.String(128), sa.ForeignKey("completions.id"), nullable=False, index=True),
    sa.Column("rating", sa.SmallInteger, nullable=False),
    sa.Column("correction", sa.Text),
    sa.Column("comment", sa.Text),
    sa.Column("user", sa.Text),  # hash_user of the rating's `user`
    sa.Column("created", sa.Double, nullable=False, index=True),
    # the key that rated, always the completion's own; NULL in rows older than this column, which the unique
    # index below leaves alone (NULLs are distinct), so a store with such rows takes the index as it is
    sa.Column("key_id", sa.String(64)),
    sa.Column("public_id", sa.String(64)),  # the id /v1/feedback answered with
    sa.CheckConstraint("rating BETWEEN -1 AND 1", name="feedback_rating_range"),
    sa.Index("feedback_once_per_key", "completion_id", "key_id", unique=True),
)

# The continual loop's cycles (`chatforge.continual.watermark`): each takes the feedback rows after the last committed
# cycle's upper id up to its own, and commits once it is done, so no row is used twice or skipped.
loop_cycles = sa.Table(
    "loop_cycles",
    metadata,
    sa.Column("cycle", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("after_feedback_id", sa.Integer, nullable=False),  # exclusive
    sa.Column("upto_feedback_id", sa.Integer, nullable=False),  # inclusive
    sa.Column("started", sa.Double, nullable=False),
    sa.Column("committed", sa.Double),  # NULL while the cycle is open
    sa.Column("record", sa.Text),  # the committed cycle's cycle.json
)


COMPARISON_CHOICES = ("first", "second", "tie")

# The human evaluation page's votes: a rater saw two completions of one prompt (from two variants, in the order
# ``first``, ``second``) and chose one or a tie, and may have flagged either as harmful. The variants are the
# completions' own: a vote names completions, never variants, so the page cannot leak which is which.
comparisons = sa.Table(
    "comparisons",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("first_completion", sa.String(128), sa.ForeignKey("completions.id"), nullable=False, unique=True),
    sa.Column("second_completion", sa.String(128), sa.ForeignKey("completions.id"), nullable=False),
    sa.Column("choice", sa.String(8), nullable=False),
    sa.Column("harmful_first", sa.Boolean, nullable=False),
    sa.Column("harmful_second", sa.Boolean, nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),  # the rater's key, the completions' own
    sa.Column("created", sa.Double, nullable=False, index=True),
    sa.CheckConstraint("choice IN ('first', 'second', 'tie')", name="comparisons_choice"),
)


@dataclass(frozen=True)
class Comparison:
    """A rater's choice between two completions of one prompt (the first as shown first)."""

    first: str
    second: str
    choice: str  # COMPARISON_CHOICES
    harmful_first: bool = False
    harmful_second: bool = False

    def __post_init__(self) -> None:
        if self.choice not in COMPARISON_CHOICES:
            raise ValueError(f"choice must be one of {COMPARISON_CHOICES}, got {self.choice!r}")
        if self.first == self.second:
            raise ValueError("a comparison needs two different completions")


class UnknownCompletion(KeyError):
    """Feedback names a completion id the store has never seen, or one another API key asked for."""


class AlreadyRated(ValueError):
    """This API key has rated this completion already: one rating per completion and key."""


class StoreUnavailable(RuntimeError):
    """The store cannot answer a look-up now (down, or slower than LOOKUP_TIMEOUT_S); the client may retry."""


class StoreBusy(RuntimeError):
    """The write queue is full: the store has fallen behind; the client may retry."""


class SchemaError(RuntimeError):
    """An existing table lacks a column that cannot be added to its rows as NULL."""


@dataclass(frozen=True)
class CompletionRecord:
    id: str
    created: float
    variant: str
    user: str | None  # as the client sent it: the store hashes it
    prompt: str  # JSON of the request's messages
    answer: str
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    guard: str  # "pass" | "flagged" | "blocked"
    guard_score: float | None
    stream: bool
    key_id: str | None = None  # the API key's id; None when served without keys


def safe_url(url: str | URL) -> str:
    """The URL as it may appear in logs and errors: the password masked."""
    return make_url(url).render_as_string(hide_password=True)


def stored_key_id(key_id: str | None) -> str:
    return ANONYMOUS_KEY_ID if key_id is None else key_id


def hash_user(user: str | None, key: bytes) -> str | None:
    """``user`` as the store keeps it: ``u-`` and the first 16 hex of its HMAC-SHA256 under ``key``.

    Keyed, because `user` values are often emails, account numbers or small integers: a plain SHA-256 of them is
    undone by hashing the likely candidates, while an HMAC needs the key, which is not in the database. Rows of one
    user still share one value, so they group together. 64 bits keep users apart (a collision among a million
    users has odds of about 3e-8) and say less than the whole digest."""
    if user is None:
        return None
    return "u-" + hmac.new(key, user.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


def is_transient(error: BaseException) -> bool:
    """Whether a failed database call may succeed when tried again: the database was unreachable, locked or busy,
    or its file's directory could not be made. A refusal (a constraint, a duplicate) is not."""
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, OSError))


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):  # URI form: leave it to sqlite
        return None
    return Path(url.database)


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url`` (nothing is connected yet); for SQLite: WAL, busy timeout, enforced foreign keys."""
    url = make_url(url)
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
        # A read-only one stays deferred: under WAL it reads while a writer holds the lock.
        read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


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


def _add_missing_columns(connection: Connection) -> list[str]:
    """Add the columns of ``metadata`` that existing tables lack (stores made by older versions); returns them.

    Every such column is nullable, so adding it is one ALTER TABLE that leaves older rows NULL there."""
    inspector = sa.inspect(connection)
    quote = connection.dialect.identifier_preparer.quote
    added = []
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable or column.primary_key:
                raise SchemaError(
                    f"the table {table.name} lacks the column {column.name}, which cannot be added to its rows: "
                    "point serve.feedback.url at a new database, or move this one aside"
                )
            kind = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}")
            added.append(f"{table.name}.{column.name}")
    return added


class FeedbackStore:
    """Completions and ratings in one database. Nothing connects until the first call, which creates the tables
    (or adds the columns an older store lacks), so a store that is down when the app starts stops nothing."""

    def __init__(self, url: str, scrub_pii: bool = True, user_hash_key: bytes | None = None) -> None:
        """``user_hash_key``: the key of ``hash_user``; None draws a random one (hashes then last as long as this
        store object: the app passes one key to all its replicas)."""
        self.url = url
        self.scrub_pii = scrub_pii
        self.user_hash_key = user_hash_key or os.urandom(32)
        self.engine = make_engine(url)
        self._ready = False
        self._prepare_lock = threading.Lock()
        logger.info("feedback store at %s", safe_url(url))

    @classmethod
    def from_spec(cls, spec: FeedbackSpec, user_hash_key: bytes | None = None) -> FeedbackStore:
        """The store the spec names; the env var ``spec.url_env``, when set and not empty, replaces ``spec.url``."""
        return cls(spec.resolved_url(), scrub_pii=spec.scrub_pii, user_hash_key=user_hash_key)

    def prepare(self) -> None:
        """Create the tables and indexes, adding the columns an older store lacks; a no-op once done."""
        with self._prepare_lock:
            if self._ready:
                return
            sqlite_file = _sqlite_file(make_url(self.url))
            if sqlite_file is not None:
                sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            with self.engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    # replicas starting together would race to create the same tables: one at a time
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                metadata.create_all(connection)
                added = _add_missing_columns(connection)
                for table in metadata.sorted_tables:
                    for index in table.indexes:
                        index.create(connection, checkfirst=True)
            if added:
                logger.warning(
                    "feedback store at %s: added the columns %s (rows written before have NULL there; their "
                    "completions take no ratings)",
                    safe_url(self.url),
                    ", ".join(added),
                )
            self._ready = True

    @contextmanager
    def _transaction(self, read_only: bool = False) -> Iterator[Connection]:
        self.prepare()
        try:
            with self.engine.connect() as connection:
                if read_only:
                    connection.execution_options(**{READ_ONLY_OPTION: True})
                with connection.begin():
                    yield connection
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            self._ready = False  # the database may be a new one now (a replaced file, a restored server): look again
            raise

    def _scrub(self, text: str | None, placeholders: dict[str, str]) -> str | None:
        if text is None or not self.scrub_pii:
            return text
        return scrub_text(text, placeholders=placeholders)[0]

    def record_completion(self, record: CompletionRecord) -> None:
        if record.guard not in GUARD_OUTCOMES:
            raise ValueError(f"guard must be one of {GUARD_OUTCOMES}, got {record.guard!r}")
        row = asdict(record)
        row["user"] = hash_user(record.user, self.user_hash_key)
        row["key_id"] = stored_key_id(record.key_id)
        if self.scrub_pii:
            placeholders: dict[str, str] = {}  # one numbering across the conversation and its answer
            row["prompt"] = _scrub_messages(record.prompt, placeholders)
            row["answer"] = self._scrub(record.answer, placeholders)
        with self._transaction() as connection:
            connection.execute(completions.insert().values(**row))

    def record_feedback(
        self,
        completion_id: str,
        rating: int,
        correction: str | None,
        comment: str | None,
        user: str | None = None,
        key_id: str | None = None,
        public_id: str | None = None,
    ) -> int:
        """Store the rating of a completion by the API key ``key_id`` (None: served without keys); returns the row id.

        Raises UnknownCompletion when no completion has this id or another key asked for it, AlreadyRated when this
        key has rated it, ValueError for a rating not in -1, 0, 1."""
        if isinstance(rating, bool) or rating not in RATINGS:
            raise ValueError(f"rating must be -1, 0 or 1, got {rating!r}")
        rater = stored_key_id(key_id)
        placeholders: dict[str, str] = {}
        row = {
            "completion_id": completion_id,
            "rating": int(rating),
            "correction": self._scrub(correction, placeholders),
            "comment": self._scrub(comment, placeholders),
            "user": hash_user(user, self.user_hash_key),
            "created": time.time(),
            "key_id": rater,
            "public_id": public_id or new_feedback_id(),
        }
        try:
            with self._transaction() as connection:
                owner = connection.execute(
                    sa.select(completions.c.key_id).where(completions.c.id == completion_id)
                ).first()
                if owner is None or owner[0] != rater:
                    raise UnknownCompletion(completion_id)
                if self._rated(connection, completion_id, rater):
                    raise AlreadyRated(completion_id)
                result = connection.execute(feedback.insert().values(**row))
                return int(result.inserted_primary_key[0])
        except sa.exc.IntegrityError as error:
            # Two transactions that both found no rating (PostgreSQL's READ COMMITTED): the unique index decides.
            if "feedback_once_per_key" in str(error.orig) or "feedback.completion_id, feedback.key_id" in str(error):
                raise AlreadyRated(completion_id) from None
            raise

    @staticmethod
    def _rated(connection: Connection, completion_id: str, rater: str) -> bool:
        query = sa.select(feedback.c.id).where(feedback.c.completion_id == completion_id, feedback.c.key_id == rater)
        return connection.execute(query.limit(1)).first() is not None

    def check_rating(self, completion_id: str, key_id: str | None) -> tuple[bool, bool, bool]:
        """(the completion exists, it was asked for with ``key_id``, ``key_id`` has rated it), in one transaction."""
        rater = stored_key_id(key_id)
        with self._transaction(read_only=True) as connection:
            owner = connection.execute(sa.select(completions.c.key_id).where(completions.c.id == completion_id)).first()
            if owner is None:
                return False, False, False
            mine = owner[0] == rater
            return True, mine, mine and self._rated(connection, completion_id, rater)

    def record_comparison(self, comparison: Comparison, key_id: str | None) -> int:
        """Store a rater's choice between two completions that ``key_id`` asked for; returns the row id.

        Raises UnknownCompletion when either completion is missing or another key's, AlreadyRated when the pair was
        voted on already."""
        rater = stored_key_id(key_id)
        try:
            with self._transaction() as connection:
                owners = dict(
                    connection.execute(
                        sa.select(completions.c.id, completions.c.key_id).where(
                            completions.c.id.in_([comparison.first, comparison.second])
                        )
                    ).all()
                )
                for completion_id in (comparison.first, comparison.second):
                    if owners.get(completion_id, object()) != rater:
                        raise UnknownCompletion(completion_id)
                voted = sa.select(comparisons.c.id).where(comparisons.c.first_completion == comparison.first)
                if connection.execute(voted).first() is not None:
                    raise AlreadyRated(comparison.first)
                result = connection.execute(
                    comparisons.insert().values(
                        first_completion=comparison.first,
                        second_completion=comparison.second,
                        choice=comparison.choice,
                        harmful_first=comparison.harmful_first,
                        harmful_second=comparison.harmful_second,
                        key_id=rater,
                        created=time.time(),
                    )
                )
                return int(result.inserted_primary_key[0])
        except sa.exc.IntegrityError as error:
            if "first_completion" in str(error):
                raise AlreadyRated(comparison.first) from None
            raise

    def comparison_votes(self) -> list[tuple[str, str, str, bool, bool]]:
        """Every vote as (first variant, second variant, choice, harmful_first, harmful_second), oldest first."""
        first, second = completions.alias("first"), completions.alias("second")
        query = (
            sa.select(
                first.c.variant,
                second.c.variant,
                comparisons.c.choice,
                comparisons.c.harmful_first,
                comparisons.c.harmful_second,
            )
            .select_from(
                comparisons.join(first, first.c.id == comparisons.c.first_completion).join(
                    second, second.c.id == comparisons.c.second_completion
                )
            )
            .order_by(comparisons.c.id)
        )
        with self._transaction(read_only=True) as connection:
            return [(a, b, choice, bool(ha), bool(hb)) for a, b, choice, ha, hb in connection.execute(query).all()]

    def counts(self) -> dict[str, int]:
        with self._transaction(read_only=True) as connection:
            return {
                "completions": connection.execute(sa.select(sa.func.count()).select_from(completions)).scalar_one(),
                "feedback": connection.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one(),
            }

    def dispose(self) -> None:
        self.engine.dispose()


def new_feedback_id() -> str:
    return f"feedback-{uuid.uuid4().hex}"


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


def feedback_query(dialect: sa.Dialect, since: float | None = None, feedback_ids: tuple[int, int] | None = None) -> str:
    """SQL of the completions left-joined with their feedback, as text for ``dialect``; with ``feedback_ids``
    (after, upto), only the rated completions whose feedback id is above ``after`` and at most ``upto``."""
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
            completions.c.key_id,
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
    if feedback_ids is not None:
        after, upto = (int(i) for i in feedback_ids)
        query = query.where(feedback.c.id > after, feedback.c.id <= upto)
    return str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def read_feedback(
    url: str, since: float | None = None, feedback_ids: tuple[int, int] | None = None
) -> ray.data.Dataset:
    """The store as a Dataset: one row per completion and feedback (completions without feedback have null
    feedback columns). ``since`` (unix seconds) keeps rows whose completion or feedback is that new or newer;
    ``feedback_ids`` (after, upto) keeps the feedback rows in that id range (a continual cycle's, `Cycle`).
    Columns: completion_id, completion_created, variant, user, prompt, answer, latency_ms, prompt_tokens,
    completion_tokens, guard, guard_score, stream (0/1 on SQLite), key_id (the API key id; empty without keys),
    feedback_id, rating, correction, comment, feedback_user, feedback_created. ``user`` and ``feedback_user`` are
    hashes (``hash_user``).
    """
    import ray.data

    dialect = make_url(url).get_dialect()()
    return ray.data.read_sql(feedback_query(dialect, since, feedback_ids), _DbapiConnection(url))
