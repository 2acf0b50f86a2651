"""The continual loop's watermark: which feedback rows a cycle reads, kept in the feedback store itself.

A cycle reads the feedback rows whose id is above the last committed cycle's upper id and at most its own upper id.
`open_cycle` fixes that range when a cycle starts and records it, uncommitted; `commit_cycle` marks it done at the
very end. A cycle that fails half-way is never committed, so running the loop again reopens the same cycle, with the
same range: no row is used twice, and none is skipped. `abandon_cycle` forgets an open cycle that has nothing to
train on (no new rows, or too few): the next cycle then starts from the same row.

The upper id leaves out rows younger than ``settle_s``: on PostgreSQL, ids are drawn when a row is inserted but seen
when its transaction commits, so a young id may still have an older neighbour on its way. A rating's transaction
lasts milliseconds; the default margin is seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from chatforge.serve.feedback import FeedbackStore, feedback, loop_cycles

SETTLE_S = 5.0


class CycleConflict(RuntimeError):
    """Another loop opened or committed this cycle at the same time."""


@dataclass(frozen=True)
class Cycle:
    number: int
    after_feedback_id: int  # exclusive
    upto_feedback_id: int  # inclusive
    reopened: bool  # an earlier run of this cycle failed before committing

    @property
    def empty(self) -> bool:
        return self.upto_feedback_id <= self.after_feedback_id


def open_cycle(store: FeedbackStore, settle_s: float = SETTLE_S, now: float | None = None) -> Cycle:
    """The next cycle: the open one an earlier run left (same range), else a new one up to the newest settled row."""
    store.prepare()
    now = time.time() if now is None else now
    try:
        with store.engine.begin() as connection:
            last = connection.execute(sa.select(loop_cycles).order_by(loop_cycles.c.cycle.desc()).limit(1)).first()
            if last is not None and last.committed is None:
                return Cycle(last.cycle, last.after_feedback_id, last.upto_feedback_id, reopened=True)
            after = last.upto_feedback_id if last is not None else 0
            newest = connection.execute(
                sa.select(sa.func.max(feedback.c.id)).where(feedback.c.created <= now - settle_s)
            ).scalar_one()
            cycle = Cycle((last.cycle if last is not None else 0) + 1, after, max(after, newest or 0), reopened=False)
            connection.execute(
                loop_cycles.insert().values(
                    cycle=cycle.number,
                    after_feedback_id=cycle.after_feedback_id,
                    upto_feedback_id=cycle.upto_feedback_id,
                    started=now,
                )
            )
            return cycle
    except sa.exc.IntegrityError as err:  # two loops drew the same cycle number: the other one has it
        raise CycleConflict("another loop opened this cycle at the same time; run one loop at a time") from err


def commit_cycle(store: FeedbackStore, cycle: Cycle, record: dict[str, Any], now: float | None = None) -> None:
    """Mark ``cycle`` done, with its record (cycle.json); its rows are then never read again."""
    with store.engine.begin() as connection:
        done = connection.execute(
            loop_cycles.update()
            .where(loop_cycles.c.cycle == cycle.number, loop_cycles.c.committed.is_(None))
            .values(committed=time.time() if now is None else now, record=json.dumps(record, default=str))
        )
        if done.rowcount != 1:
            raise CycleConflict(f"cycle {cycle.number} is already committed (or gone): another loop finished it")


def abandon_cycle(store: FeedbackStore, cycle: Cycle) -> None:
    """Forget the open ``cycle``: its rows are read again by the next cycle, which takes its number."""
    with store.engine.begin() as connection:
        gone = connection.execute(
            loop_cycles.delete().where(loop_cycles.c.cycle == cycle.number, loop_cycles.c.committed.is_(None))
        )
        if gone.rowcount != 1:
            raise CycleConflict(f"cycle {cycle.number} is no longer open: another loop committed or abandoned it")


def cycles(store: FeedbackStore) -> list[dict[str, Any]]:
    """Every cycle so far, oldest first, as rows of loop_cycles (``record`` parsed)."""
    store.prepare()
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(loop_cycles).order_by(loop_cycles.c.cycle)).mappings().all()
    return [{**row, "record": json.loads(row["record"]) if row["record"] else None} for row in rows]
