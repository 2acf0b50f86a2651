"""Writing to the feedback store in the background: `StoreWriter`, so that no answer of the ingress waits for the
database. Writes go in arrival order from one task, are retried while the database is slow or down, and wait in a
bounded queue (see the class for what happens at each limit)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatforge.serve.feedback import (
    AlreadyRated,
    Comparison,
    CompletionRecord,
    FeedbackStore,
    StoreBusy,
    StoreUnavailable,
    UnknownCompletion,
    is_transient,
    new_feedback_id,
    safe_url,
    stored_key_id,
)

logger = logging.getLogger(__name__)

RETRY_FIRST_S = 0.05  # the first retry's wait; each next one waits twice as long, up to RETRY_MAX_S
RETRY_MAX_S = 5.0
LOOKUP_TIMEOUT_S = 5.0  # a rating's look-up of its completion; past it the API answers 503
# With several ingress replicas, a rating may reach a replica other than the one that answered its completion,
# and before that one's row is written: the look-up is repeated after these waits before the answer is 404.
PEER_LOOKUP_WAITS_S = (0.05, 0.1, 0.2, 0.4, 0.8)


@dataclass
class _Recent:
    key_id: str  # as stored (stored_key_id)
    raters: set[str] = field(default_factory=set)
    compared: bool = False  # shown first in a comparison that was voted on


@dataclass(frozen=True)
class _Write:
    record: str  # "schema", "completion", "feedback" or "comparison": the metrics' tag
    name: str  # the completion or feedback id, for logs
    write: Callable[[], Any]
    queued: float = field(default_factory=time.monotonic)


class StoreWriter:
    """Writes to a FeedbackStore from one background task, so no answer waits for the database.

    - In order: one task writes the queue first in, first out, so a rating is written after its completion.
    - Retried: a write that fails for a reason that may pass (``is_transient``: unreachable, locked, busy) is tried
      again with exponential backoff, RETRY_FIRST_S doubling up to RETRY_MAX_S; the next writes wait behind it.
      Only a write that still fails ``retry_window_s`` after it was queued is dropped (logged, counted
      ``expired``). One the database refuses (``rejected``: a duplicate rating, a completion that never got in) is
      dropped at once.
    - Bounded: at most ``queue_size`` writes wait. A completion beyond is not stored (logged, counted
      ``queue_full``; its answer is already on its way); a rating beyond is refused with StoreBusy (the API answers
      503 and the client retries), so nothing is lost silently.
    - Known before written: ``rate`` checks a rating against the completions this replica queued (the newest
      2 × ``queue_size`` of them, which include every one still queued) and the ratings it took, and asks the
      database only about older ones, so a rating posted right after its completion finds it, whatever the queue
      holds.
    """

    def __init__(
        self,
        store: FeedbackStore,
        metrics: Any,
        queue_size: int = 10_000,
        retry_window_s: float = 600.0,
        peers: bool = False,
    ) -> None:
        """``metrics``: a ServeMetrics (``store_write_error``, ``store_queue``); ``peers``: other ingress replicas
        write to the same database (their completions may arrive there after a rating of them reaches this one)."""
        self.store = store
        self.metrics = metrics
        self.queue: asyncio.Queue[_Write] = asyncio.Queue(queue_size)
        self.retry_window_s = retry_window_s
        self.peer_waits = PEER_LOOKUP_WAITS_S if peers else ()
        self.recent_limit = 2 * queue_size
        self.healthy: bool | None = None  # None until the store first answers or fails
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._task: asyncio.Task | None = None
        self._writing = False
        self._put(_Write("schema", safe_url(store.url), store.prepare))  # reach the store at start, not at first use

    def start(self) -> None:
        """Start the writing task on the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="feedback-store-writer")

    def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.healthy else "degraded", "queued": self.queue.qsize()}

    # ------------------------------------------------------------ what the ingress calls

    def add_completion(self, record: CompletionRecord) -> bool:
        """Queue a completion; False (logged and counted) when the queue is full. Never waits."""
        self.start()
        if not self._put(_Write("completion", record.id, functools.partial(self.store.record_completion, record))):
            logger.error(
                "feedback store at %s is %d writes behind: the completion %s is not stored",
                safe_url(self.store.url),
                self.queue.qsize(),
                record.id,
            )
            return False
        self._remember(record.id, _Recent(stored_key_id(record.key_id)))
        return True

    async def rate(
        self,
        completion_id: str,
        key_id: str | None,
        rating: int,
        correction: str | None,
        comment: str | None,
        user: str | None,
    ) -> str:
        """Queue the rating of a completion by the key ``key_id``; returns its public id.

        Raises UnknownCompletion (no such completion, or another key's), AlreadyRated (this key rated it),
        StoreUnavailable (the database must be asked and cannot answer), StoreBusy (the queue is full)."""
        self.start()
        rater = stored_key_id(key_id)
        entry = await self._owned(completion_id, rater)  # from here to the end nothing awaits: checked and taken
        if rater in entry.raters:
            raise AlreadyRated(completion_id)
        public_id = new_feedback_id()
        write = functools.partial(
            self.store.record_feedback, completion_id, rating, correction, comment, user, key_id, public_id
        )
        if not self._put(_Write("feedback", public_id, write)):
            raise StoreBusy(
                f"The feedback store is {self.queue.qsize()} writes behind; the rating was not taken. Retry in a "
                "moment."
            )
        entry.raters.add(rater)
        self._recent.move_to_end(completion_id)  # to the newest end: it outlasts the rating's wait in the queue
        return public_id

    async def compare(self, comparison: Comparison, key_id: str | None) -> None:
        """Queue a rater's choice between two completions the key ``key_id`` asked for (the human evaluation page).

        Raises UnknownCompletion (either completion missing, or another key's), AlreadyRated (this pair was voted
        on), StoreUnavailable, StoreBusy, as ``rate`` does."""
        self.start()
        rater = stored_key_id(key_id)
        await self._owned(comparison.second, rater)
        first = await self._owned(comparison.first, rater)  # from here to the end nothing awaits
        if first.compared:
            raise AlreadyRated(comparison.first)
        write = functools.partial(self.store.record_comparison, comparison, key_id)
        if not self._put(_Write("comparison", comparison.first, write)):
            raise StoreBusy(
                f"The feedback store is {self.queue.qsize()} writes behind; the choice was not taken. Retry in a "
                "moment."
            )
        first.compared = True
        self._recent.move_to_end(comparison.first)

    async def _owned(self, completion_id: str, rater: str) -> _Recent:
        """What this replica knows of a completion ``rater`` asked for, asking the database when it knows nothing;
        UnknownCompletion when there is no such completion or it is another key's."""
        if completion_id not in self._recent:
            await self._look_up(completion_id, rater)
        entry = self._recent.get(completion_id)
        if entry is None or entry.key_id != rater:
            raise UnknownCompletion(completion_id)
        return entry

    async def _look_up(self, completion_id: str, rater: str) -> None:
        """Ask the database about a completion this replica does not know of; remember it when it is ``rater``'s."""
        for wait in (0.0, *self.peer_waits):
            await asyncio.sleep(wait)
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                    exists, mine, rated = await asyncio.to_thread(self.store.check_rating, completion_id, rater)
            except TimeoutError:
                raise StoreUnavailable(
                    f"The feedback store did not answer within {LOOKUP_TIMEOUT_S:g} s. Retry in a moment."
                ) from None
            except Exception as error:
                if not is_transient(error):
                    raise
                self._failed(error)
                raise StoreUnavailable("The feedback store cannot be reached. Retry in a moment.") from None
            if completion_id in self._recent:  # another rating of it looked it up meanwhile
                return
            if exists:
                if mine:
                    self._remember(completion_id, _Recent(rater, {rater} if rated else set()))
                return

    def _remember(self, completion_id: str, entry: _Recent) -> None:
        self._recent[completion_id] = entry
        while len(self._recent) > self.recent_limit:
            self._recent.popitem(last=False)

    # ------------------------------------------------------------ the writing task

    def _put(self, write: _Write) -> bool:
        try:
            self.queue.put_nowait(write)
        except asyncio.QueueFull:
            self.metrics.store_write_error(write.record, "queue_full")
            return False
        self.metrics.store_queue(self.queue.qsize())
        return True

    def _failed(self, error: BaseException) -> None:
        if self.healthy is not False:
            logger.error("feedback store at %s is unavailable: %s", safe_url(self.store.url), _first_line(error))
        self.healthy = False

    async def _run(self) -> None:
        while True:
            write = await self.queue.get()
            self._writing = True
            try:
                await self._write(write)
            except Exception:  # a bug in one write must not stop every later one
                logger.exception("writing the %s %s failed", write.record, write.name)
            finally:
                self._writing = False
                self.queue.task_done()
                self.metrics.store_queue(self.queue.qsize())

    async def _write(self, write: _Write) -> None:
        wait, attempt = RETRY_FIRST_S, 1
        while True:
            try:
                await asyncio.to_thread(write.write)
            except Exception as error:
                if not is_transient(error):
                    self.metrics.store_write_error(write.record, "rejected")
                    logger.error(
                        "the feedback store refused the %s %s: %s", write.record, write.name, _first_line(error)
                    )
                    return
                self._failed(error)
                if time.monotonic() - write.queued >= self.retry_window_s:
                    self.metrics.store_write_error(write.record, "expired")
                    logger.error(
                        "the %s %s is dropped: the feedback store failed it for %g s (retry_window_s): %s",
                        write.record,
                        write.name,
                        self.retry_window_s,
                        _first_line(error),
                    )
                    return
                self.metrics.store_write_error(write.record, "retry")
                logger.warning(
                    "writing the %s %s failed (attempt %d; again in %.2g s; %d more waiting): %s",
                    write.record,
                    write.name,
                    attempt,
                    wait,
                    self.queue.qsize(),
                    _first_line(error),
                )
                await asyncio.sleep(wait)
                wait, attempt = min(wait * 2, RETRY_MAX_S), attempt + 1
                continue
            if self.healthy is False:
                logger.warning("feedback store at %s is back; writing the queue", safe_url(self.store.url))
            self.healthy = True
            return

    async def close(self, timeout_s: float) -> int:
        """Write what is queued, for up to ``timeout_s``, then stop; returns the writes left unwritten (logged)."""
        if self._task is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.queue.join()
            except TimeoutError:
                pass
            self._task.cancel()
        left = self.queue.qsize() + self._writing
        if left:
            logger.error(
                "feedback store at %s: %d writes were not written before shutdown", safe_url(self.store.url), left
            )
        return left


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------- reading back with Ray Data
