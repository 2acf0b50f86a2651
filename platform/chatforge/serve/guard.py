"""The toxicity guard of the API: score what users send and what the model answers, then block or flag.

The scorer is the curation one (``chatforge.data.toxicity.build_scorer``: the offline "targeted" scorer by
default, detoxify for production), so serving and curation agree on what toxic means. Per direction the policy
is ``block`` (refuse: the app answers ``refusal``), ``flag`` (serve, but mark the completion in the feedback
store) or ``off`` (not scored at all).
"""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.config import GuardSpec
from chatforge.data.toxicity import TOXICITY_LABEL, Scorer, build_scorer


@dataclass(frozen=True)
class Verdict:
    score: float  # the worst toxicity probability seen; 0.0 when the policy is off
    flagged: bool  # over the threshold (whatever the policy did about it)
    blocked: bool  # over the threshold and the policy is "block"


PASS = Verdict(score=0.0, flagged=False, blocked=False)


def _text_of(content) -> str:
    """A message's text: a string, or the text parts of an OpenAI list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


class Guard:
    def __init__(self, spec: GuardSpec) -> None:
        self.spec = spec
        self.refusal = spec.refusal
        self.threshold = spec.toxicity.threshold
        needed = spec.input_policy != "off" or spec.output_policy != "off"
        self.scorer: Scorer | None = build_scorer(spec.toxicity) if needed else None

    def _verdict(self, texts: list[str], policy: str) -> Verdict:
        texts = [text for text in texts if text.strip()]
        if policy == "off" or not texts or self.scorer is None:
            return PASS
        score = max(scores[TOXICITY_LABEL] for scores in self.scorer.score(texts))
        over = score >= self.threshold
        return Verdict(score=score, flagged=over, blocked=over and policy == "block")

    def check_input(self, messages: list[dict[str, str]]) -> Verdict:
        """The worst of the user turns (system and assistant turns are the operator's and the model's)."""
        user_texts = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
        return self._verdict(user_texts, self.spec.input_policy)

    def check_output(self, text: str) -> Verdict:
        return self._verdict([text], self.spec.output_policy)
