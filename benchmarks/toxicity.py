"""Toxicity scorers on a labeled template set and on the chitchat corpus: what each drops, per category.

    .venv/bin/python benchmarks/toxicity.py --json        # ~1-2 minutes on 2 cores

Options measured (a scorer and a threshold; a turn is toxic at score >= threshold):
  profanity@T            alt-profanity-check's model on the whole turn (the old default was T = 0.8)
  profanity-sentence@T   the same model on each sentence of the turn, the turn scoring its worst sentence
  targeted@T             `chatforge.safety.targeted.TargetedScorer`, the default (rude words counted where aimed at
                         the addressee, plus slurs, threats and wishes of harm)
On `chatforge.safety.evalset.template_set()` each option reports, per category and split ("dev": the phrasings the
targeted rules were written against; "heldout": written before the rules were last changed and never used to
change them), the share of examples scored toxic: the recall for abusive categories, the false-positive rate for
benign ones; and the precision and recall of "abusive" over the whole template set. On the chitchat corpus (its
multi-turn conversations as `chatforge curate` reaches the toxicity step with pipelines/quickstart.yaml's settings)
each option goes through the curation policy itself (`score_records`: user and assistant turns scored, a toxic
assistant turn drops the conversation) and reports the share of conversations dropped and the seconds it scored for.
Prints a JSON object (with ``--json``, one line, last).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

THRESHOLDS = {"profanity": (0.5, 0.8, 0.9, 0.95), "profanity-sentence": (0.8, 0.95), "targeted": (0.45, 0.8, 0.9)}
TARGETS = {"chitchat_drop_rate_max": 0.01, "abusive_recall_min": 0.9, "benign_drop_rate_max": 0.0}


class SentenceMaxScorer:
    """A scorer's "toxicity" per sentence (split as the targeted scorer splits), a text scoring its worst sentence."""

    labels = ("toxicity",)

    def __init__(self, base) -> None:
        self.base = base

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        from chatforge.safety.targeted import sentences

        owners, parts = [], []
        for index, text in enumerate(texts):
            for sentence in sentences(text) or [""]:
                owners.append(index)
                parts.append(sentence)
        worst = [0.0] * len(texts)
        for owner, scores in zip(owners, self.base.score(parts), strict=True):
            worst[owner] = max(worst[owner], scores["toxicity"])
        return [{"toxicity": value} for value in worst]


def template_figures(scores: list[float], examples, threshold: float) -> dict:
    """Per category and split: examples, scored toxic, share; and precision/recall of "abusive" over all of them."""
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    true_pos = false_pos = abusive = 0
    for example, score in zip(examples, scores, strict=True):
        toxic = score >= threshold
        for split in (example.split, "all"):
            counts[example.category][split][0] += 1
            counts[example.category][split][1] += toxic
        abusive += example.abusive
        true_pos += toxic and example.abusive
        false_pos += toxic and not example.abusive
    categories = {
        category: {split: {"n": n, "toxic": k, "rate": round(k / n, 3)} for split, (n, k) in sorted(splits.items())}
        for category, splits in counts.items()
    }
    return {
        "categories": categories,
        "precision": round(true_pos / max(true_pos + false_pos, 1), 3),
        "recall": round(true_pos / max(abusive, 1), 3),
    }


def chitchat_figures(scorer, conversations: list[dict], thresholds: tuple[float, ...]) -> tuple[dict, float]:
    """Through the curation policy once; each threshold is then the share of conversations whose worst assistant
    turn reaches it (what `score_records` would drop at that threshold)."""
    from chatforge.config import ToxicitySpec
    from chatforge.data.toxicity import score_records

    records = [dict(record) for record in conversations]
    start = time.perf_counter()
    scored = score_records(records, scorer, ToxicitySpec(threshold=min(thresholds)))
    seconds = time.perf_counter() - start
    worst = [record["toxicity"] for record in scored if record["toxicity"] is not None]
    dropped = {str(t): sum(value >= t for value in worst) for t in thresholds}
    return dropped, seconds


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+changes" if dirty.strip() else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON result, as one line")
    parser.add_argument("--skip-chitchat", action="store_true", help="the template set only (seconds)")
    args = parser.parse_args()
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    from chatforge.config import load_spec
    from chatforge.safety.evalset import chitchat_conversations, template_set
    from chatforge.safety.scorers import ProfanityScorer
    from chatforge.safety.targeted import TargetedScorer

    profanity = ProfanityScorer()
    scorers = {
        "profanity": profanity,
        "profanity-sentence": SentenceMaxScorer(profanity),
        "targeted": TargetedScorer(profanity),
    }
    examples = template_set()
    conversations = []
    if not args.skip_chitchat:
        log("reading the chitchat corpus as curation sees it ...")
        conversations = chitchat_conversations(load_spec(os.path.join(ROOT, "pipelines", "quickstart.yaml")).curate)

    options = []
    for name, scorer in scorers.items():
        scores = [result["toxicity"] for result in scorer.score([example.text for example in examples])]
        dropped, seconds = chitchat_figures(scorer, conversations, THRESHOLDS[name]) if conversations else ({}, 0.0)
        for threshold in THRESHOLDS[name]:
            option = {"option": f"{name}@{threshold}", **template_figures(scores, examples, threshold)}
            if conversations:
                option["chitchat_dropped"] = dropped[str(threshold)]
                option["chitchat_drop_rate"] = round(dropped[str(threshold)] / len(conversations), 4)
                option["chitchat_seconds"] = round(seconds, 1)
            options.append(option)
            log(
                f"{option['option']:24s} precision {option['precision']:.3f} recall {option['recall']:.3f} "
                f"chitchat {option.get('chitchat_drop_rate', float('nan')):.2%}  "
                + " ".join(
                    f"{category}={figures['all']['rate']:.2f}" for category, figures in option["categories"].items()
                )
            )
    result = {
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "template_examples": len(examples),
        "chitchat_conversations": len(conversations),
        "targets": TARGETS,
        "options": options,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
