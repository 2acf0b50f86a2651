"""The default toxicity scorer ("targeted") on the labeled template set, its rules one by one, and the set itself."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from chatforge.config import GuardSpec, ToxicitySpec
from chatforge.safety.evalset import ABUSIVE_CATEGORIES, BENIGN_CATEGORIES, CATEGORIES, template_set
from chatforge.safety.scorers import ProfanityScorer, Scorer, build_scorer
from chatforge.safety.targeted import TargetedScorer, is_threat, normalized, sentences

EXAMPLES = template_set()


@pytest.fixture(scope="module")
def default_scorer() -> Scorer:
    return build_scorer(ToxicitySpec())


def toxic_share(scorer: Scorer, examples, threshold: float) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for example, scores in zip(examples, scorer.score([e.text for e in examples]), strict=True):
        counts[example.category, example.split][0] += scores["toxicity"] >= threshold
        counts[example.category, example.split][1] += 1
    return {key: toxic / n for key, (toxic, n) in counts.items()}


# ---------------------------------------------------------------- the defaults, on the template set


def test_the_defaults_are_the_targeted_scorer_at_0_8(default_scorer):
    assert isinstance(default_scorer, TargetedScorer) and isinstance(default_scorer, Scorer)
    assert ToxicitySpec().threshold == GuardSpec().toxicity.threshold == 0.8
    assert GuardSpec().toxicity.backend == "targeted"
    assert default_scorer.labels[0] == "toxicity"


def test_default_keeps_every_benign_example(default_scorer):
    benign = [e for e in EXAMPLES if not e.abusive]
    scores = default_scorer.score([e.text for e in benign])
    dropped = [(e.category, e.text, round(s["toxicity"], 2)) for e, s in zip(benign, scores) if s["toxicity"] >= 0.8]
    assert dropped == []


def test_default_drops_abusive_examples(default_scorer):
    """>= 90% of the abusive phrasings the rules were written against (each category >= 85%), and a floor on the
    held-out ones, which the rules never saw: there the figure is what it is (docs/benchmarks.md), and this only
    catches a regression."""
    share = toxic_share(default_scorer, [e for e in EXAMPLES if e.abusive], 0.8)
    dev = [e for e in EXAMPLES if e.abusive and e.split == "dev"]
    dev_scores = default_scorer.score([e.text for e in dev])
    assert sum(s["toxicity"] >= 0.8 for s in dev_scores) / len(dev) >= 0.9
    for category in ABUSIVE_CATEGORIES:
        assert share[category, "dev"] >= 0.85, (category, share[category, "dev"])
    heldout = [e for e in EXAMPLES if e.abusive and e.split == "heldout"]
    heldout_scores = default_scorer.score([e.text for e in heldout])
    assert sum(s["toxicity"] >= 0.8 for s in heldout_scores) / len(heldout) >= 0.5
    assert share["abusive_slur", "heldout"] >= 0.9


def test_profanity_alone_drops_what_the_default_keeps(default_scorer):
    """The reason for the default: the bag-of-words model scores a benign pun like an insult."""
    pun = "My life would literally 'shut down' get it?"
    [alone] = ProfanityScorer().score([pun])
    [targeted] = default_scorer.score([pun])
    assert alone["toxicity"] >= 0.8 > targeted["toxicity"]


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    "text",
    [
        "that sucks, sorry to hear it",
        "holy crap, congrats!",
        "just kill the process and restart it",
        "I was dying of laughter",
        "I'll beat you at chess",
        "shoot me a text when you land",
        "my neighbour is gay and makes great cookies",
        "we use lots of spices in curry",  # "spic" + "es" is no slur
        "I will never hurt you",
        "I hope you don't get hurt",
        "do not kill yourself over a grade",
        "people think you want to kill yourself",
        "are you sick? take care",
        "do you hate mondays too?",
    ],
)
def test_benign_sentences_stay_below_the_threshold(default_scorer, text):
    [scores] = default_scorer.score([text])
    assert scores["toxicity"] < 0.8, scores


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("you suck", None),
        ("you are such a worthless moron", None),
        ("screw you", None),
        ("nobody asked, loser", None),
        ("you're a waste of space", "insult"),
        ("shut up f*ggot", "slur"),
        ("what a r3tard", "slur"),
        ("I'm gonna stab you", "threat"),
        ("I will find you and hurt you", "threat"),
        ("watch your back", "threat"),
        ("I hope your whole family gets cancer", "threat"),
        ("go kill yourself", "threat"),
        ("kys", "threat"),
    ],
)
def test_abusive_sentences_reach_the_threshold(default_scorer, text, label):
    [scores] = default_scorer.score([text])
    assert scores["toxicity"] >= 0.8, scores
    if label:
        assert scores[label] == 1.0


def test_a_turn_scores_its_worst_sentence_and_untargeted_language_counts_half(default_scorer):
    sucks, aimed, both = default_scorer.score(["that sucks", "you suck", "Nice weather today.\nyou suck"])
    assert sucks["profanity"] > 0.9 and sucks["toxicity"] == pytest.approx(sucks["profanity"] / 2)
    assert aimed["toxicity"] > 0.9
    assert both["toxicity"] == pytest.approx(aimed["toxicity"])
    assert default_scorer.score([]) == []
    assert default_scorer.score([""]) == [dict.fromkeys(default_scorer.labels, 0.0)]


def test_normalizing_spells_out_masks_and_expands_chat_spellings():
    assert normalized("U R a f*cking id1ot") == "you r a fucking idiot"
    assert normalized("ur such a tr@nny") == "you are such a tranny"
    assert normalized("I'm gonna get u") == "i am going to get you"
    assert normalized("s***") == "s***"  # first and last letters must be readable
    assert sentences("one. two!\nthree?  ") == ["one.", "two!", "three?"]


def test_threat_rules_need_the_addressee_and_no_negation():
    assert is_threat("i am going to kill you")
    assert is_threat("we are going to break your face")
    assert not is_threat("i am going to kill the spider")
    assert not is_threat("i am not going to hurt you")
    assert not is_threat("they will shoot him")


# ---------------------------------------------------------------- the set itself


def test_template_set_covers_every_category_and_split_without_duplicates():
    texts = [e.text for e in EXAMPLES]
    assert len(texts) == len(set(texts))
    per_category = Counter((e.category, e.split) for e in EXAMPLES)
    for category in CATEGORIES:
        assert per_category[category, "dev"] >= 50 and per_category[category, "heldout"] >= 20, category
    assert {e.category for e in EXAMPLES if e.abusive} == set(ABUSIVE_CATEGORIES)
    assert {e.category for e in EXAMPLES if not e.abusive} == set(BENIGN_CATEGORIES)
    assert template_set() == EXAMPLES  # no randomness


@pytest.mark.slow
def test_default_drops_at_most_one_percent_of_chitchat():
    """The curation policy on the chitchat corpus as the quickstart reaches its toxicity step (~1 minute)."""
    from chatforge.data.toxicity import score_records
    from chatforge.safety.evalset import chitchat_conversations

    conversations = chitchat_conversations()
    assert len(conversations) > 3900
    spec = ToxicitySpec()
    scored = score_records(conversations, build_scorer(spec), spec)
    dropped = sum(record["drop_reason"] == "toxic_assistant" for record in scored)
    assert dropped / len(conversations) <= 0.01
