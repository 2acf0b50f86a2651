"""The toxicity guard of the API: score what clients send and what the model answers, then block or flag.

The scorer is the curation one (``chatforge.safety.scorers.build_scorer``: the offline "targeted" scorer by
default, detoxify for production), so serving and curation agree on what toxic means. Per direction the policy
is ``block`` (refuse: the app answers ``refusal``), ``flag`` (serve, but mark the completion in the feedback
store) or ``off`` (not scored at all). A streamed answer under ``block`` goes through ``StreamGuard``, which sends
only text that has been scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.config import GuardSpec
from chatforge.safety.scorers import TOXICITY_LABEL, Scorer, build_scorer


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
        self.blocks_output = spec.output_policy == "block"
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
        """The worst of all turns: a client writes the system and assistant turns it sends as freely as the user's."""
        return self._verdict([_text_of(m.get("content")) for m in messages], self.spec.input_policy)

    def check_output(self, text: str) -> Verdict:
        return self._verdict([text], self.spec.output_policy)


class StreamGuard:
    """The output guard of one stream under ``block``: text is sent only after it has been scored with its context.

    The last ``window`` characters wait, as a possible stop sequence does. Once ``window`` more have arrived, the text
    from ``window`` characters before the first unsent one to the end is scored, and what lies before the waiting
    window is released if it passes. At the end the whole answer is scored, as the non-streaming path scores it.
    So every character sent was scored with ``window`` characters (or the answer's edge) on each side, and a stream
    is cut, never finished, whenever the non-streaming path would refuse the whole answer.
    """

    def __init__(self, guard: Guard, window: int) -> None:
        self.guard = guard
        self.window = window
        self.text = ""
        self.sent = 0  # characters of text released
        self._logprobs: list[tuple[int, tuple]] = []  # (end of the text they came with, logprobs), unreleased
        self.worst = PASS  # the highest-scoring verdict so far
        self.blocked = False

    def add(self, text: str, logprobs: tuple = ()) -> None:
        self.text += text
        if logprobs:
            self._logprobs.append((len(self.text), tuple(logprobs)))

    def due(self) -> bool:
        """Whether ``release`` would send something: ``window`` characters beyond the waiting window."""
        return len(self.text) - self.sent >= 2 * self.window

    def release(self, final: bool = False) -> tuple[str, list] | None:
        """Score, then the text (and its tokens' logprobs) that may go out; None once the guard refuses.

        Blocking CPU work: call it off the event loop."""
        if self.blocked:
            return None
        if final:
            end, verdict = len(self.text), self.guard.check_output(self.text)
        else:
            end = len(self.text) - self.window
            verdict = self.guard.check_output(self.text[max(0, self.sent - self.window) :])
        if verdict.score >= self.worst.score:
            self.worst = verdict
        if verdict.blocked:
            self.blocked = True
            return None
        text, self.sent = self.text[self.sent : end], max(self.sent, end)
        logprobs = [lp for position, group in self._logprobs if position <= self.sent for lp in group]
        self._logprobs = [(position, group) for position, group in self._logprobs if position > self.sent]
        return text, logprobs
