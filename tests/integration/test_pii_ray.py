"""PiiStep on a Ray Dataset: placeholders in the messages, typed counts per row, dropped rows scrubbed too."""

from __future__ import annotations

import pyarrow as pa
import pytest

from chatforge.config import PII_TYPES, PiiSpec
from chatforge.data.batches import records_to_table
from chatforge.data.pii import PII_COUNTS_TYPE, PiiStep
from chatforge.data.schema import BASE_SCHEMA, STAGE_SECONDS_COLUMN, STAGE_SECONDS_TYPE, with_columns

ZEROS = dict.fromkeys(PII_TYPES, 0)


def _row(row_id: str, turns: list[str], drop_reason: str | None = None) -> dict:
    roles = ["user", "assistant"]
    return {
        "id": row_id,
        "source": "test",
        "messages": [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)],
        "meta": "{}",
        "raw": None,
        "drop_reason": drop_reason,
        STAGE_SECONDS_COLUMN: None,
    }


@pytest.mark.integration
def test_pii_step_on_a_dataset(ray_local):
    rows = [
        _row("t:1", ["I'm ann@example.com, call 555-123-4567", "Hi ann@example.com, noted."]),
        _row("t:2", ["my card is 4111 1111 1111 1111", "Never share it; the server is at 203.0.113.7"]),
        _row("t:3", ["leaked ann@example.com", "ok"], drop_reason="filters:no_assistant"),
        _row("t:4", ["What is 2+2?", "It is 4, as of 2024-01-15."]),
    ]
    schema = with_columns(BASE_SCHEMA, {STAGE_SECONDS_COLUMN: STAGE_SECONDS_TYPE})
    ds = ray_local.data.from_arrow(records_to_table(rows, schema))

    table = pa.concat_tables(ray_local.get(PiiStep(PiiSpec())(ds).to_arrow_refs()))

    assert table.schema.field("pii_counts").type == PII_COUNTS_TYPE
    out = table.to_pylist()

    by_id = {r["id"]: r for r in out}
    assert sorted(by_id) == ["t:1", "t:2", "t:3", "t:4"]
    assert [m["content"] for m in by_id["t:1"]["messages"]] == ["I'm [EMAIL_1], call [PHONE_1]", "Hi [EMAIL_1], noted."]
    assert by_id["t:1"]["pii_counts"] == {**ZEROS, "email": 2, "phone": 1}
    assert [m["content"] for m in by_id["t:2"]["messages"]] == [
        "my card is [CARD_1]",
        "Never share it; the server is at [IP_1]",
    ]
    assert by_id["t:2"]["pii_counts"] == {**ZEROS, "card": 1, "ip": 1}
    assert by_id["t:3"]["messages"][0]["content"] == "leaked [EMAIL_1]"  # dropped/ is written out too
    assert by_id["t:3"]["pii_counts"] == {**ZEROS, "email": 1}
    assert by_id["t:4"]["messages"] == rows[3]["messages"]
    assert by_id["t:4"]["pii_counts"] == ZEROS
    # the stage charged its time to the stage-seconds column
    timings = [dict(r[STAGE_SECONDS_COLUMN] or []) for r in out]
    assert any("pii" in t for t in timings)
