"""alt-profanity-check's profanity model as plain arrays: TF-IDF word features into sigmoid-calibrated linear scores.

The model is the one the alt-profanity-check package ships (a TF-IDF vectorizer and a sigmoid-calibrated linear
SVM trained by its authors), converted once into `profanity_model.npz` beside this file by
`benchmarks/profanity_model.py`, which checks the arrays against the package's own `predict_prob` before writing
them. The file records the package version it came from (``source``) and the package's MIT licence (``license``).

Loading reads numpy arrays and nothing else (``allow_pickle=False``): no unpickling, so the file cannot run code,
and neither scikit-learn nor joblib is imported in the processes that score. Prediction is a word lookup, a few dot
products and sigmoids.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

MODEL_FILE = "profanity_model.npz"

# What the file holds; every entry is a numpy array of numbers or unicode strings.
_ARRAYS = ("words", "idf", "coef", "intercept", "sigmoid_a", "sigmoid_b", "token_pattern", "source", "license")


@dataclass(frozen=True)
class LinearProfanityModel:
    """TF-IDF features (lower-cased words, l2-normalised) into K sigmoid-calibrated linear scores, averaged."""

    token_pattern: re.Pattern
    vocabulary: dict[str, int]  # word -> its column
    idf: np.ndarray  # (V,)
    coef: np.ndarray  # (K, V): one linear SVM per calibration fold
    intercept: np.ndarray  # (K,)
    sigmoid_a: np.ndarray  # (K,)
    sigmoid_b: np.ndarray  # (K,)
    source: str = ""  # where the weights come from, e.g. "alt-profanity-check 1.9.1"
    license: str = ""

    def predict_prob(self, texts: list[str]) -> np.ndarray:
        """P(profane) per text, as alt-profanity-check's `predict_prob`."""
        n = len(texts)
        lookup = self.vocabulary.get
        findall = self.token_pattern.findall
        rows: list[int] = []
        features: list[int] = []
        for i, text in enumerate(texts):
            # Stop words need no removal: the vocabulary was built without them, so they are not in it.
            found = [j for j in map(lookup, findall(text.lower())) if j is not None]
            features.extend(found)
            rows.extend([i] * len(found))
        width = len(self.idf)
        keys, counts = np.unique(
            np.asarray(rows, np.int64) * width + np.asarray(features, np.int64), return_counts=True
        )
        doc, feature = np.divmod(keys, width)
        weight = counts * self.idf[feature]
        norm = np.sqrt(np.bincount(doc, weight * weight, minlength=n))
        weight = weight / norm[doc]  # every doc here has a feature, so its norm is > 0; the others score 0
        dots = np.stack([np.bincount(doc, weight * row[feature], minlength=n) for row in self.coef])
        decisions = dots + self.intercept[:, None]
        with np.errstate(over="ignore"):
            probs = 1.0 / (1.0 + np.exp(self.sigmoid_a[:, None] * decisions + self.sigmoid_b[:, None]))
        return probs.mean(axis=0)


def load_profanity_model(path: str | Path | None = None) -> LinearProfanityModel:
    """The model in ``path`` (default: the file shipped with chatforge), read as plain arrays."""
    source = resources.files(__package__).joinpath(MODEL_FILE) if path is None else Path(path)
    with source.open("rb") as handle, np.load(handle, allow_pickle=False) as npz:
        missing = [name for name in _ARRAYS if name not in npz.files]
        if missing:
            raise ValueError(f"{source}: not a profanity model file (no {', '.join(missing)})")
        arrays = {name: npz[name] for name in _ARRAYS}
    words, idf, coef = arrays["words"], arrays["idf"], arrays["coef"]
    folds = len(arrays["intercept"])
    if idf.shape != words.shape or coef.shape != (folds, len(words)) or arrays["sigmoid_a"].shape != (folds,):
        raise ValueError(
            f"{source}: inconsistent shapes (words {words.shape}, idf {idf.shape}, coef {coef.shape}, "
            f"{folds} intercepts); rebuild it with benchmarks/profanity_model.py"
        )
    return LinearProfanityModel(
        token_pattern=re.compile(str(arrays["token_pattern"])),
        vocabulary={str(word): column for column, word in enumerate(words)},
        idf=idf.astype(np.float64),
        coef=coef.astype(np.float64),
        intercept=arrays["intercept"].astype(np.float64),
        sigmoid_a=arrays["sigmoid_a"].astype(np.float64),
        sigmoid_b=arrays["sigmoid_b"].astype(np.float64),
        source=str(arrays["source"]),
        license=str(arrays["license"]),
    )


def save_profanity_model(model: LinearProfanityModel, path: str | Path) -> None:
    """Write ``model`` as `load_profanity_model` reads it. The archive's entries carry a fixed date, so the same
    model always makes the same bytes."""
    words = sorted(model.vocabulary, key=model.vocabulary.__getitem__)
    if [model.vocabulary[word] for word in words] != list(range(len(model.idf))):
        raise ValueError("the vocabulary's columns are not 0..V-1")
    arrays = {
        "words": np.asarray(words, dtype=str),
        "idf": model.idf,
        "coef": model.coef,
        "intercept": model.intercept,
        "sigmoid_a": model.sigmoid_a,
        "sigmoid_b": model.sigmoid_b,
        "token_pattern": np.asarray(model.token_pattern.pattern),
        "source": np.asarray(model.source),
        "license": np.asarray(model.license),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in _ARRAYS:
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w") as handle:
                np.lib.format.write_array(handle, np.asarray(arrays[name]), allow_pickle=False)
