"""The human evaluation pages' parts that need no server: the tally of votes into win rates with Wilson intervals,
form parsing, escaping, and the store's and writer's rules for a vote (two completions of the rater's own, once)."""

from __future__ import annotations

import asyncio
import time

import pytest

from chatforge.config import ServeSpec
from chatforge.serve.feedback import AlreadyRated, Comparison, CompletionRecord, FeedbackStore, UnknownCompletion
from chatforge.serve.ui import Pair, comparison_from_form, pair_results, parse_form, render, wilson_interval
from chatforge.serve.writer import StoreWriter


class NoMetrics:
    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


def completion(completion_id: str, variant: str, key_id: str | None = "key-a") -> CompletionRecord:
    return CompletionRecord(
        id=completion_id,
        created=time.time(),
        variant=variant,
        user=None,
        prompt='[{"role": "user", "content": "hi"}]',
        answer=f"answer of {variant}",
        latency_ms=1.0,
        prompt_tokens=1,
        completion_tokens=1,
        guard="pass",
        guard_score=None,
        stream=False,
        key_id=key_id,
    )


def test_votes_tally_per_unordered_pair_whichever_was_shown_first():
    votes = [
        ("beta", "alpha", "first", False, False),  # beta shown first and chosen
        ("alpha", "beta", "second", False, True),  # beta shown second and chosen; beta flagged
        ("alpha", "beta", "first", True, False),  # alpha chosen; alpha flagged
        ("beta", "alpha", "tie", False, False),
        ("alpha", "gamma", "first", False, False),
    ]
    alpha_beta, alpha_gamma = pair_results(votes)
    assert (alpha_beta.a, alpha_beta.b) == ("alpha", "beta")
    assert (alpha_beta.a_wins, alpha_beta.b_wins, alpha_beta.ties, alpha_beta.votes) == (1, 2, 1, 4)
    assert (alpha_beta.harmful_a, alpha_beta.harmful_b) == (1, 1)
    assert alpha_beta.win_rate == pytest.approx(1 / 3)
    assert alpha_beta.low < 1 / 3 < alpha_beta.high
    assert (alpha_gamma.a_wins, alpha_gamma.votes, alpha_gamma.win_rate) == (1, 1, 1.0)
    only_ties = pair_results([("a", "b", "tie", False, False)])[0]
    assert only_ties.win_rate is None and only_ties.as_dict()["interval"] == [None, None]


def test_wilson_interval_matches_the_textbook_and_stays_in_bounds():
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)  # Wilson 95% for 8 of 10
    assert wilson_interval(0, 5)[0] == 0.0 and 0 < wilson_interval(0, 5)[1] < 1
    assert wilson_interval(5, 5)[1] == pytest.approx(1.0) and 0 < wilson_interval(5, 5)[0] < 1
    narrow, wide = wilson_interval(60, 100), wilson_interval(6, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more votes, a tighter interval


def test_a_vote_form_is_parsed_or_refused_naming_what_is_wrong():
    vote = comparison_from_form(parse_form(b"first=c1&second=c2&choice=tie&harmful_second=1"))
    assert vote == Comparison("c1", "c2", "tie", harmful_first=False, harmful_second=True)
    with pytest.raises(ValueError, match="lacks choice"):
        comparison_from_form(parse_form(b"first=c1&second=c2"))
    with pytest.raises(ValueError, match="choice must be one of"):
        comparison_from_form(parse_form(b"first=c1&second=c2&choice=both"))
    with pytest.raises(ValueError, match="choice more than once"):
        parse_form(b"first=c1&second=c2&choice=first&choice=second")
    with pytest.raises(ValueError, match="two different completions"):
        comparison_from_form(parse_form(b"first=c1&second=c1&choice=first"))


def test_pages_escape_model_text_and_load_nothing_from_elsewhere():
    evil = '<script>alert("x")</script><img src="https://example.com/a.png">'
    page = render("compare", pair=Pair(evil, "c1", evil, "c2", "fine"), saved=False, error=None, max_prompt_chars=10)
    assert "<script>" not in page and "&lt;script&gt;" in page
    plain = render("compare", pair=Pair("hi", "c1", "a", "c2", "b"), saved=True, error=None, max_prompt_chars=10)
    assert "http://" not in plain and "https://" not in plain and "<script" not in plain  # nothing from elsewhere
    assert 'lang="en"' in page and "<label" in page and 'name="choice"' in page
    results = render("results", pairs=pair_results([("a", "b", "first", False, False)]), total=1)
    assert "<table>" in results and "<caption>" in results and "100%" in results


def test_human_eval_variants_must_be_served_variants():
    variants = [{"name": "a"}, {"name": "b"}]
    ServeSpec.model_validate({"variants": variants, "human_eval": {"variants": ["a", "b"]}})
    with pytest.raises(ValueError, match=r"\['c'\] are not among"):
        ServeSpec.model_validate({"variants": variants, "human_eval": {"variants": ["a", "c"]}})
    with pytest.raises(ValueError, match="two or more"):
        ServeSpec.model_validate({"variants": variants, "human_eval": {"variants": ["a"]}})


def test_the_store_takes_a_vote_on_the_raters_own_completions_once(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'store.db'}")
    for record in (completion("c1", "alpha"), completion("c2", "beta"), completion("c3", "beta", key_id="key-b")):
        store.record_completion(record)
    store.record_comparison(Comparison("c1", "c2", "second", harmful_first=True), "key-a")
    assert store.comparison_votes() == [("alpha", "beta", "second", True, False)]
    with pytest.raises(AlreadyRated):
        store.record_comparison(Comparison("c1", "c2", "first"), "key-a")
    with pytest.raises(UnknownCompletion):  # another key's completion
        store.record_comparison(Comparison("c2", "c3", "first"), "key-a")
    with pytest.raises(UnknownCompletion):
        store.record_comparison(Comparison("c2", "nope", "first"), "key-a")
    store.dispose()


def test_the_writer_refuses_a_second_vote_and_anothers_completions_before_the_database(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'store.db'}")

    async def scenario():
        writer = StoreWriter(store, NoMetrics())
        writer.add_completion(completion("c1", "alpha"))
        writer.add_completion(completion("c2", "beta"))
        writer.add_completion(completion("c3", "beta", key_id="key-b"))
        await writer.compare(Comparison("c1", "c2", "first"), "key-a")
        with pytest.raises(AlreadyRated):
            await writer.compare(Comparison("c1", "c2", "second"), "key-a")
        with pytest.raises(UnknownCompletion):
            await writer.compare(Comparison("c2", "c3", "first"), "key-a")
        assert await writer.close(10) == 0

    asyncio.run(scenario())
    assert store.comparison_votes() == [("alpha", "beta", "first", False, False)]
    store.dispose()
