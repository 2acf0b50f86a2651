"""The human evaluation pages the ingress serves: ``/ui/compare`` shows a prompt and two variants' answers in random,
unnamed order and takes the rater's choice (A, B or tie, and harmful flags); ``/ui/results`` shows the win rate of
each variant pair with a 95% Wilson interval.

The pages are server-rendered HTML forms (Jinja2, autoescaped: answers are untrusted text) with inline CSS and no
script, so they work offline, with a keyboard and with a screen reader. They are protected like the API: a bearer
key, or the same key given once on the sign-in form and kept in an HttpOnly, SameSite=Strict cookie (so another site
cannot post a vote in the rater's name). A vote names the two completions, never the variants; the store finds the
variants from the completions when it counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import parse_qs

from chatforge.serve.feedback import COMPARISON_CHOICES, Comparison

KEY_COOKIE = "chatforge_ui_key"
CONFIDENCE = 0.95


@functools.cache
def _templates():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("chatforge.serve", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


PAGE_DEFAULTS = {"signed_in": False, "error": None, "pair": None, "saved": False, "max_prompt_chars": 2000}


def render(page: str, **context) -> str:
    """``page``.html with ``context`` over PAGE_DEFAULTS."""
    return _templates().get_template(f"{page}.html").render(**{**PAGE_DEFAULTS, **context})


@dataclass(frozen=True)
class Pair:
    """What the compare page shows: a prompt and two completions, ``first`` shown as A."""

    prompt: str
    first_id: str
    first_text: str
    second_id: str
    second_text: str


def parse_form(raw: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as {field: value}; ValueError on a field given twice."""
    fields = parse_qs(raw.decode("utf-8", errors="strict"), keep_blank_values=True, strict_parsing=False)
    repeated = sorted(name for name, values in fields.items() if len(values) > 1)
    if repeated:
        raise ValueError(f"the form gives {', '.join(repeated)} more than once")
    return {name: values[0] for name, values in fields.items()}


def comparison_from_form(form: dict[str, str]) -> Comparison:
    """The vote a compare form posted; ValueError naming what is missing or wrong."""
    missing = [name for name in ("first", "second", "choice") if not form.get(name)]
    if missing:
        raise ValueError(f"the form lacks {', '.join(missing)}")
    if form["choice"] not in COMPARISON_CHOICES:
        raise ValueError(f"choice must be one of {', '.join(COMPARISON_CHOICES)}, got {form['choice']!r}")
    return Comparison(
        first=form["first"],
        second=form["second"],
        choice=form["choice"],
        harmful_first=bool(form.get("harmful_first")),
        harmful_second=bool(form.get("harmful_second")),
    )


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (scipy's), which stays inside [0, 1] and is sound for
    the few votes a page collects, where the normal approximation is not."""
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class PairResult:
    """The votes between variants ``a`` and ``b`` (alphabetical), whichever was shown first."""

    a: str
    b: str
    a_wins: int
    b_wins: int
    ties: int
    harmful_a: int
    harmful_b: int

    @property
    def votes(self) -> int:
        return self.a_wins + self.b_wins + self.ties

    @property
    def win_rate(self) -> float | None:
        """A's share of the votes that were not ties; None without such votes."""
        decisive = self.a_wins + self.b_wins
        return self.a_wins / decisive if decisive else None

    @functools.cached_property
    def interval(self) -> tuple[float, float]:
        """The 95% Wilson interval of A's win rate (over the votes that were not ties)."""
        return wilson_interval(self.a_wins, self.a_wins + self.b_wins)

    @property
    def low(self) -> float:
        return self.interval[0]

    @property
    def high(self) -> float:
        return self.interval[1]

    def as_dict(self) -> dict:
        interval = self.interval if self.win_rate is not None else (None, None)
        return {
            "a": self.a,
            "b": self.b,
            "votes": self.votes,
            "a_wins": self.a_wins,
            "b_wins": self.b_wins,
            "ties": self.ties,
            "a_win_rate": self.win_rate,
            "interval": list(interval),
            "harmful": {self.a: self.harmful_a, self.b: self.harmful_b},
        }


def pair_results(votes: list[tuple[str, str, str, bool, bool]]) -> list[PairResult]:
    """Per unordered variant pair, from the store's votes (first variant, second variant, choice, harmful_first,
    harmful_second); pairs in name order."""
    tally: dict[tuple[str, str], list[int]] = {}
    for first, second, choice, harmful_first, harmful_second in votes:
        a, b = sorted((first, second))
        counts = tally.setdefault((a, b), [0, 0, 0, 0, 0])  # a wins, b wins, ties, a harmful, b harmful
        if choice == "tie":
            counts[2] += 1
        else:
            winner = first if choice == "first" else second
            counts[0 if winner == a else 1] += 1
        counts[3] += (harmful_first and first == a) + (harmful_second and second == a)
        counts[4] += (harmful_first and first == b) + (harmful_second and second == b)
    return [PairResult(a, b, *counts) for (a, b), counts in sorted(tally.items())]
