import json

import pytest

from chatforge import runtime
from chatforge.config import AugmentSpec, FiltersSpec, NormalizeSpec, SplitSpec
from chatforge.data.augment import augment_records, turn_slices
from chatforge.data.filters import (
    filter_reason,
    filter_records,
    merge_consecutive_turns,
    repair_turns,
    role_order_problem,
    trim_leading_assistant,
)
from chatforge.data.normalize import clean_text
from chatforge.data.split import assign_split, split_records


def msg(role, content):
    return {"role": role, "content": content}


def record(messages, rid="s:1", source="s", drop=None):
    return {"id": rid, "source": source, "messages": messages, "meta": "{}", "raw": None, "drop_reason": drop}


def test_normalize_repairs_mojibake_controls_and_whitespace():
    spec = NormalizeSpec()
    assert clean_text("caf\u00c3\u00a9", spec) == "caf\u00e9"
    assert clean_text("a\x00b\u200bc\x1b", spec) == "abc"
    assert clean_text("  a \t  b \r\n\r\n\r\n\n c  ", spec) == "a b\n\nc"


def test_role_order():
    assert role_order_problem([msg("user", "a"), msg("assistant", "b")]) is None
    assert role_order_problem([msg("system", "s"), msg("user", "a"), msg("assistant", "b")]) is None
    assert "in a row" in role_order_problem([msg("user", "a"), msg("user", "b"), msg("assistant", "c")])
    assert "open" in role_order_problem([msg("assistant", "a"), msg("user", "b")])
    assert "system" in role_order_problem([msg("user", "a"), msg("system", "b")])


def test_filter_reasons_in_order():
    spec = FiltersSpec(max_message_chars=10, max_total_chars=15, max_tokens=3)
    ok = [msg("user", "hi"), msg("assistant", "hey")]
    assert filter_reason(ok, spec)[0] is None
    assert filter_reason([msg("user", "hi"), msg("assistant", " ")], spec)[0] == "empty_turn"
    assert filter_reason([msg("user", "hi")], spec)[0] == "too_few_turns"
    assert filter_reason([msg("user", "x" * 11), msg("assistant", "y")], spec)[0] == "message_too_long"
    assert filter_reason([msg("user", "x" * 9), msg("assistant", "y" * 9)], spec)[0] == "too_long"
    assert filter_reason([msg("user", "a"), msg("system", "b"), msg("assistant", "c")], spec)[0] == "role_order"
    assert filter_reason([msg("system", "a"), msg("user", "b")], spec)[0] == "no_assistant_turn"
    assert filter_reason([msg("user", "a b"), msg("assistant", "c d")], spec)[0] == "too_many_tokens"


def test_filter_empty_turns_removed_when_not_dropping():
    spec = FiltersSpec(drop_empty_turns=False)
    reason, kept, repairs = filter_reason([msg("user", "a"), msg("assistant", ""), msg("assistant", "b")], spec)
    assert reason is None and [m["content"] for m in kept] == ["a", "b"] and repairs == []
    # removing an empty turn can leave two turns of one role in a row: they are merged
    reason, kept, repairs = filter_reason([msg("user", "a"), msg("assistant", ""), msg("user", "b")], spec)
    assert kept == [msg("user", "a\n\nb")] and repairs == ["merged_turns"] and reason == "too_few_turns"


def test_leading_assistant_turns_are_trimmed_after_a_system_turn():
    part = [msg("assistant", "the answer"), msg("assistant", "continued"), msg("user", "q"), msg("assistant", "a")]
    assert trim_leading_assistant(part) == part[2:]
    assert trim_leading_assistant([msg("system", "s"), *part]) == [msg("system", "s"), *part[2:]]
    whole = [msg("system", "s"), msg("user", "q"), msg("assistant", "a")]
    assert trim_leading_assistant(whole) is whole
    assert trim_leading_assistant([msg("assistant", "lone answer")]) == []
    assert trim_leading_assistant([]) == []


def test_consecutive_turns_of_one_role_are_merged_with_a_blank_line():
    convo = [msg("user", "a"), msg("user", "b"), msg("user", "c"), msg("assistant", "d"), msg("assistant", "e")]
    assert merge_consecutive_turns(convo) == [msg("user", "a\n\nb\n\nc"), msg("assistant", "d\n\ne")]
    assert convo[0] == msg("user", "a")  # the input is not changed in place
    alternating = [msg("system", "s"), msg("user", "a"), msg("assistant", "b")]
    assert merge_consecutive_turns(alternating) == alternating


def test_repairs_follow_the_policies():
    part = [msg("assistant", "x"), msg("assistant", "y"), msg("user", "a"), msg("user", "b"), msg("assistant", "c")]
    fixed = [msg("user", "a\n\nb"), msg("assistant", "c")]
    # leading assistant turns are trimmed, not merged, so the repair is named once per kind
    assert repair_turns(part, FiltersSpec()) == (fixed, ["leading_assistant", "merged_turns"])
    assert repair_turns(part, FiltersSpec(leading_assistant="drop"))[1] == ["merged_turns"]
    assert repair_turns(part, FiltersSpec(consecutive_turns="drop")) == (part[2:], ["leading_assistant"])
    assert repair_turns(fixed, FiltersSpec()) == (fixed, [])

    assert filter_reason(part, FiltersSpec()) == (None, fixed, ["leading_assistant", "merged_turns"])
    for policy in ({"leading_assistant": "drop"}, {"consecutive_turns": "drop"}):
        assert filter_reason(part, FiltersSpec(**policy)).reason == "role_order"
    unchecked = filter_reason(part, FiltersSpec(require_alternation=False))
    assert unchecked == (None, part, [])  # without the role-order check nothing is repaired either


def test_repairs_run_before_the_turn_and_assistant_checks():
    spec = FiltersSpec()
    assert filter_reason([msg("assistant", "lone answer")], spec)[0] == "too_few_turns"
    assert filter_reason([msg("assistant", "answer"), msg("user", "next question")], spec)[0] == "too_few_turns"
    left = filter_reason([msg("system", "s"), msg("assistant", "answer"), msg("user", "q")], spec)
    assert left == ("no_assistant_turn", [msg("system", "s"), msg("user", "q")], ["leading_assistant"])
    merged = filter_reason(
        [msg("user", "x" * 6), msg("user", "y" * 6), msg("assistant", "z")], FiltersSpec(max_message_chars=10)
    )
    assert merged.reason == "message_too_long"


def test_a_repaired_record_keeps_its_original_messages_in_meta():
    part = [msg("assistant", "answer"), msg("user", "q"), msg("user", "q2"), msg("assistant", "a")]
    rows = [
        {**record(part, rid="s:1"), "meta": json.dumps({"origin": "dump.json#record=2"})},
        record([msg("user", "q"), msg("assistant", "a")], rid="s:2"),
        record([msg("assistant", "lone answer")], rid="s:3"),
        record([msg("gpt", "?")], rid="s:4", drop="malformed:unknown_role"),
    ]
    repaired, plain, lone, malformed = filter_records(rows, FiltersSpec())
    assert repaired["drop_reason"] is None and repaired["repairs"] == ["leading_assistant", "merged_turns"]
    assert repaired["messages"] == [msg("user", "q\n\nq2"), msg("assistant", "a")] and repaired["n_turns"] == 2
    assert json.loads(repaired["meta"]) == {"origin": "dump.json#record=2", "original_messages": part}
    assert plain["repairs"] == [] and json.loads(plain["meta"]) == {}
    assert lone["drop_reason"] == "too_few_turns" and lone["repairs"] == ["leading_assistant"]
    assert json.loads(lone["meta"])["original_messages"] == [msg("assistant", "lone answer")]
    assert malformed["repairs"] is None and malformed["meta"] == "{}"


def test_manifest_counts_repairs_of_kept_records():
    from chatforge.data.pipeline import block_stats, merge_stats

    def row(repairs, drop=None, augmented=False):
        return {"drop_reason": drop, "repairs": repairs, "augmented": augmented, "split": "train"}

    first = block_stats([row(["leading_assistant"]), row(["leading_assistant", "merged_turns"]), row([])])
    second = block_stats(
        [row(["merged_turns"]), row(["leading_assistant"], drop="too_few_turns"), row(None, drop="malformed:x")]
        + [row(["leading_assistant"], augmented=True)]  # a slice of a repaired record is not a second repair
    )
    total = merge_stats([json.loads(json.dumps(first)), json.loads(json.dumps(second))])  # as the stats rows carry them
    assert total["repaired"] == {"leading_assistant": 2, "merged_turns": 2}
    assert total["kept"] == 4


def test_filter_records_language_and_first_reason_wins():
    spec = FiltersSpec(languages=["en"])
    rows = [
        record([msg("user", "hello how are you doing today my friend"), msg("assistant", "I am doing well thank you")]),
        record([msg("user", "bonjour comment allez-vous aujourd'hui"), msg("assistant", "je vais très bien merci")]),
        record([msg("user", "hi")], drop="malformed:x"),
    ]
    out = filter_records(rows, spec)
    assert out[0]["drop_reason"] is None and out[0]["lang"] == "en" and out[0]["n_turns"] == 2
    assert out[1]["drop_reason"] == "language:fr"
    assert out[2]["drop_reason"] == "malformed:x" and out[2]["n_turns"] is None


def test_augment_conditions_on_source_and_slices():
    spec = AugmentSpec(system_prompts={"s": "Be kind."}, tags={"s": "support"}, slice_turns=True)
    convo = [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "d")]
    out = augment_records([record(convo), record([msg("user", "x")], rid="s:2", drop="too_few_turns")], spec)
    assert out[0]["messages"][0] == {"role": "system", "content": "[support] Be kind."}
    assert json.loads(out[0]["meta"])["tag"] == "support"
    assert len(out) == 3  # the original, one slice, the dropped row untouched
    assert out[1]["augmented"] and out[1]["parent_id"] == "s:1" and out[1]["messages"][-1]["content"] == "b"
    assert out[2]["drop_reason"] == "too_few_turns" and out[2]["messages"] == [msg("user", "x")]
    assert turn_slices(convo) == [convo[:2]]


def test_augment_keeps_a_conversations_own_system_prompt():
    spec = AugmentSpec(default_system_prompt="Default.")
    own = [msg("system", "Own."), msg("user", "a"), msg("assistant", "b")]
    assert augment_records([record(own)], spec)[0]["messages"][0]["content"] == "Own."


def test_split_is_stable_follows_ratios_and_parents():
    spec = SplitSpec(train=0.8, val=0.1, test=0.1)
    splits = [assign_split(f"s:{i}", spec) for i in range(20000)]
    assert splits == [assign_split(f"s:{i}", spec) for i in range(20000)]
    assert abs(splits.count("train") / 20000 - 0.8) < 0.02
    assert abs(splits.count("val") / 20000 - 0.1) < 0.01
    slice_row = {**record([]), "id": "s:5#slice1", "parent_id": "s:5"}
    out = split_records([record([], rid="s:5"), slice_row, record([], rid="s:6", drop="x")], spec)
    assert out[0]["split"] == out[1]["split"] == assign_split("s:5", spec)
    assert out[2]["split"] is None


def test_consecutive_record_steps_run_as_one_udf_with_the_same_result():
    import pyarrow as pa

    from chatforge.data.batches import apply_steps
    from chatforge.data.filters import FiltersStep
    from chatforge.data.normalize import NormalizeStep
    from chatforge.data.schema import STAGE_SECONDS_COLUMN
    from chatforge.data.sources import RECORD_SCHEMA
    from chatforge.data.split import SplitStep

    class FakeDataset:  # records what apply_steps maps; runs each UDF on one in-memory table
        def __init__(self, table, udfs=()):
            self.table, self.udfs = table, list(udfs)

        def map_batches(self, fn, batch_format):
            assert batch_format == "pyarrow"
            return FakeDataset(fn(self.table), [*self.udfs, fn])

    rows = [
        {
            "id": f"s:{i}",
            "source": "s",
            "messages": [{"role": "user", "content": " hi  there "}, {"role": "assistant", "content": "hello"}],
            "meta": "{}",
            "raw": None,
            "drop_reason": None,
        }
        for i in range(20)
    ]
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    steps = [NormalizeStep(NormalizeSpec()), FiltersStep(FiltersSpec(min_turns=1)), SplitStep(SplitSpec())]
    chained = apply_steps(FakeDataset(table), steps)
    one_by_one = FakeDataset(table)
    for step in steps:
        one_by_one = one_by_one.map_batches(step.record_fn(), batch_format="pyarrow")

    assert len(chained.udfs) == 1 and chained.udfs[0].stages == ["normalize", "filters", "split"]
    assert chained.table.schema == one_by_one.table.schema
    strip = lambda t: t.drop_columns([STAGE_SECONDS_COLUMN]).to_pylist()  # noqa: E731  (timings differ)
    assert strip(chained.table) == strip(one_by_one.table)
    assert {k for k, _ in chained.table[STAGE_SECONDS_COLUMN][0].as_py()} == {"normalize", "filters", "split"}
    assert chained.table["messages"][0].as_py()[0]["content"] == "hi there"


def test_freed_heap_goes_back_to_the_os_after_a_batch():
    if runtime._malloc_trim() is None:
        pytest.skip("not glibc: malloc_trim does not exist here")

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    # 64 KB strings live in malloc's heap (below its mmap threshold); freeing every other one leaves 64 MB of free
    # pages in the middle of the heap, which glibc keeps until asked.
    held = [bytes(64 * 1024 - 64) + bytes([i % 256]) * 32 for i in range(2048)]
    del held[::2]
    before = rss_mb()
    runtime.release_freed_heap()
    assert before - rss_mb() > 32
    assert len(held) == 1024


def test_the_condition_step_goes_after_dedup_and_before_toxicity_unless_placed():
    from chatforge.data.condition import earlier_assistant_turns, with_condition_step

    assert with_condition_step(["normalize", "filters", "pii", "dedup", "toxicity", "augment", "split"]) == [
        "normalize",
        "filters",
        "pii",
        "dedup",
        "condition",
        "toxicity",
        "augment",
        "split",
    ]
    assert with_condition_step(["normalize", "split"]) == ["normalize", "condition", "split"]
    assert with_condition_step(["normalize"]) == ["normalize", "condition"]
    assert with_condition_step(["condition", "normalize"]) == ["condition", "normalize"]

    def roles(*names: str) -> list[dict[str, str]]:
        return [{"role": name, "content": ""} for name in names]

    assert earlier_assistant_turns(roles("user", "assistant")) == []
    assert earlier_assistant_turns(roles("system", "user", "assistant", "user", "assistant")) == [2]
    assert earlier_assistant_turns(roles("user", "assistant", "user")) == [1]  # no final answer: every one is context
