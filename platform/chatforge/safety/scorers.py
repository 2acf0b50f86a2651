"""Toxicity scorers: what curation, evaluation and the serving guard share.

A `Scorer` takes texts and returns one ``{label: probability}`` per text, always with the label "toxicity".
`build_scorer` makes the one a `ToxicitySpec` names (``backend``):
  targeted   the offline default (`chatforge.safety.targeted.TargetedScorer`): the profanity model's words counted
             where they are aimed at the addressee, plus slurs, threats and wishes of harm;
  profanity  `ProfanityScorer`, alt-profanity-check's model on the whole text;
  detoxify   `DetoxifyScorer`, the production backend.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Protocol, runtime_checkable

from chatforge.config import ToxicitySpec
from chatforge.safety.profanity_model import load_profanity_model

TOXICITY_LABEL = "toxicity"


@runtime_checkable
class Scorer(Protocol):
    """Texts in, one {label: probability} per text out, in order; the labels include "toxicity"."""

    labels: tuple[str, ...]

    def score(self, texts: list[str]) -> list[dict[str, float]]: ...


class ProfanityScorer:
    """alt-profanity-check's TF-IDF + calibrated linear model (`chatforge.safety.profanity_model`, shipped with
    chatforge as plain arrays): backend "profanity", and the judge of words inside the default "targeted" backend.

    A bag of words: it knows profanity and insults, not who they are aimed at ("that sucks" scores like "you suck")
    nor threats without rude words; use detoxify for production data.
    """

    labels = (TOXICITY_LABEL,)

    def __init__(self) -> None:
        self._predict_prob = load_profanity_model().predict_prob

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        return [{TOXICITY_LABEL: float(p)} for p in self._predict_prob(texts)]


class DetoxifyScorer:
    """The production backend: `detoxify.Detoxify`, labels toxicity, severe_toxicity, obscene, threat, insult, ...

    ``checkpoint`` is a local checkpoint file (offline; ``huggingface_config_path`` or the checkpoint's own
    ``arch.args.model_type`` must then be a local dir with the HF config and tokenizer) or a published name
    ("original", "unbiased", "multilingual", ...), which detoxify downloads from its GitHub releases.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        huggingface_config_path: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        from detoxify import Detoxify
        from detoxify.detoxify import MODEL_URLS

        checkpoint = checkpoint or "original"
        if checkpoint in MODEL_URLS:
            # detoxify fetches these with torch.hub and weights_only=False: trusted as detoxify's own releases.
            self.model = Detoxify(model_type=checkpoint, device=device, huggingface_config_path=huggingface_config_path)
        elif Path(checkpoint).is_file():
            self.model = Detoxify(
                checkpoint=_safe_checkpoint(checkpoint), device=device, huggingface_config_path=huggingface_config_path
            )
        else:
            raise FileNotFoundError(
                f"toxicity.checkpoint {checkpoint!r} is neither a file nor a published detoxify model "
                f"({', '.join(MODEL_URLS)}); give a local checkpoint path or one of those names"
            )
        self.labels = tuple(self.model.class_names)
        self.batch_size = batch_size

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        # Forward passes over texts of similar length, so short turns are not padded to the longest of the batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[dict[str, float]] = [{} for _ in texts]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            predicted = self.model.predict([texts[i] for i in chunk])
            for label, values in predicted.items():
                # detoxify squeezes a one-text batch to a bare float
                values = values if isinstance(values, list) else [values]
                for index, value in zip(chunk, values, strict=True):
                    results[index][label] = float(value)
        return results


def _safe_checkpoint(path: str) -> io.BytesIO:
    """The checkpoint's bytes, after proving they unpickle with ``weights_only=True``.

    detoxify 0.5.4 calls ``torch.load(checkpoint, weights_only=False)`` with no way to change it, and an
    unrestricted unpickle can run arbitrary code. Its format is plain data (dicts, lists, strings, tensors), so we
    first load the bytes with the restricted unpickler, then hand detoxify the same in-memory bytes: the file cannot
    change between the check and the load. Costs one extra transient copy of the checkpoint in memory.
    """
    import torch

    buffer = io.BytesIO(Path(path).read_bytes())
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: this checkpoint holds pickled objects besides tensors and plain data, which could run code "
            "when loaded; re-save it from a trusted environment as torch.save({'config': <plain dict>, "
            f"'state_dict': <tensors>}}, path).\n{err}"
        ) from None
    except Exception as err:
        raise ValueError(f"{path}: not a torch checkpoint detoxify can read: {err}") from err
    buffer.seek(0)
    return buffer


def build_scorer(spec: ToxicitySpec) -> Scorer:
    """The scorer a spec names, with its model loaded."""
    if spec.backend == "detoxify":
        return DetoxifyScorer(spec.checkpoint, spec.huggingface_config_path, spec.device)
    if spec.backend == "targeted":
        from chatforge.safety.targeted import TargetedScorer

        return TargetedScorer(ProfanityScorer())
    return ProfanityScorer()
