"""alt-profanity-check's model, read from the package's own files without importing scikit-learn.

The package ships a TF-IDF vectorizer and a sigmoid-calibrated linear SVM as joblib pickles, and unpickles them
when it is imported, which imports scikit-learn and, through it, scipy's stats and pandas: ~1.9 s in every process
that scores (each curation worker, each serving replica with the guard on), for a model whose prediction is a
dictionary lookup per word, five dot products and five sigmoids. `load_linear_model` reads the same two files with
a restricted unpickler (numpy arrays and the estimators' attributes only; any other class is refused, so a
tampered file cannot run code), checks that the estimators are of the kind computed here, and
`LinearProfanityModel.predict_prob` returns what `profanity_check.predict_prob` returns (tests compare the two on
the package's own answers). A model of any other kind raises `UnsupportedModel`; `toxicity.ProfanityScorer` then
uses the package itself.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
from dataclasses import dataclass

import numpy as np

# The estimators the package pickles, read as plain attribute holders (their state is all that prediction needs).
_ESTIMATORS = {
    ("sklearn.feature_extraction.text", "TfidfVectorizer"),
    ("sklearn.feature_extraction.text", "TfidfTransformer"),
    ("sklearn.calibration", "CalibratedClassifierCV"),
    ("sklearn.calibration", "_CalibratedClassifier"),
    ("sklearn.calibration", "_SigmoidCalibration"),
    ("sklearn.svm._classes", "LinearSVC"),
}
# What numpy arrays inside a joblib pickle are built from.
_ARRAY_MODULES = {"numpy", "numpy._core.multiarray", "numpy.core.multiarray", "numpy._core.numeric"}
_ARRAY_GLOBALS = {"ndarray", "dtype", "scalar", "_reconstruct", "float64", "int64", "int32"}


class UnsupportedModel(ValueError):
    """The package's files hold something other than the TF-IDF + sigmoid-calibrated linear model computed here."""


class _EstimatorState:
    """An estimator's pickled attributes, without its class."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _estimator_class(module: str, name: str) -> type:
    return type(name, (_EstimatorState,), {"__module__": module})


def _restricted_unpickler():
    from joblib.numpy_pickle import NumpyUnpickler  # joblib stores arrays after the pickle; ~0.3 s to import

    class RestrictedUnpickler(NumpyUnpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _ESTIMATORS:
                return _estimator_class(module, name)
            if (module in _ARRAY_MODULES and name in _ARRAY_GLOBALS) or (module, name) == (
                "joblib.numpy_pickle",
                "NumpyArrayWrapper",
            ):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a TF-IDF + linear model")

    return RestrictedUnpickler


def _load(path: str):
    with open(path, "rb") as handle:
        return _restricted_unpickler()(path, handle, ensure_native_byte_order=True).load()


def package_data_dir() -> str:
    """Where alt-profanity-check keeps its model, found without importing the package (its import loads it)."""
    spec = importlib.util.find_spec("profanity_check")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("alt-profanity-check is not installed (pip install alt-profanity-check)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@dataclass(frozen=True)
class LinearProfanityModel:
    """TF-IDF features (lower-cased words, l2-normalised) into K sigmoid-calibrated linear scores, averaged."""

    token_pattern: re.Pattern
    vocabulary: dict[str, int]
    idf: np.ndarray  # (V,)
    coef: np.ndarray  # (K, V): one linear SVM per calibration fold
    intercept: np.ndarray  # (K,)
    sigmoid_a: np.ndarray  # (K,)
    sigmoid_b: np.ndarray  # (K,)

    def predict_prob(self, texts: list[str]) -> np.ndarray:
        """P(profane) per text, as `profanity_check.predict_prob`."""
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


def load_linear_model(data_dir: str | None = None) -> LinearProfanityModel:
    """The package's vectorizer and calibrated classifier as a `LinearProfanityModel`; `UnsupportedModel` if they
    are of another kind (a later package version may change them)."""
    data_dir = data_dir or package_data_dir()
    vectorizer = _load(os.path.join(data_dir, "vectorizer.joblib"))
    model = _load(os.path.join(data_dir, "model.joblib"))
    expected = {
        "analyzer": "word",
        "lowercase": True,
        "preprocessor": None,
        "tokenizer": None,
        "strip_accents": None,
        "ngram_range": (1, 1),
        "binary": False,
        "norm": "l2",
        "use_idf": True,
        "sublinear_tf": False,
    }
    differs = {key: got for key, want in expected.items() if (got := getattr(vectorizer, key, "<missing>")) != want}
    if type(vectorizer).__name__ != "TfidfVectorizer" or differs:
        raise UnsupportedModel(f"vectorizer {type(vectorizer).__name__} with {differs}")
    idf = np.asarray(getattr(getattr(vectorizer, "_tfidf", None), "idf_", None), dtype=np.float64)
    classes = getattr(model, "classes_", None)
    folds = getattr(model, "calibrated_classifiers_", [])
    if (
        type(model).__name__ != "CalibratedClassifierCV"
        or getattr(model, "method", None) != "sigmoid"
        or classes is None
        or list(classes) != [0, 1]
        or not folds
    ):
        raise UnsupportedModel(f"classifier {type(model).__name__} (method {getattr(model, 'method', None)!r})")
    coef, intercept, sigmoid_a, sigmoid_b = [], [], [], []
    for fold in folds:
        estimator, calibrators = fold.estimator, fold.calibrators
        if type(estimator).__name__ != "LinearSVC" or len(calibrators) != 1:
            raise UnsupportedModel(f"calibrated {type(estimator).__name__} with {len(calibrators)} calibrators")
        coef.append(np.asarray(estimator.coef_, np.float64).reshape(-1))
        intercept.append(float(np.asarray(estimator.intercept_).reshape(-1)[0]))
        sigmoid_a.append(float(calibrators[0].a_))
        sigmoid_b.append(float(calibrators[0].b_))
    vocabulary = {str(word): int(index) for word, index in vectorizer.vocabulary_.items()}
    if idf.ndim != 1 or len(idf) != len(vocabulary) or any(len(row) != len(idf) for row in coef):
        raise UnsupportedModel(f"{len(vocabulary)} words, {idf.shape} idf weights, coefficients {len(coef[0])}")
    return LinearProfanityModel(
        token_pattern=re.compile(vectorizer.token_pattern),
        vocabulary=vocabulary,
        idf=idf,
        coef=np.stack(coef),
        intercept=np.asarray(intercept),
        sigmoid_a=np.asarray(sigmoid_a),
        sigmoid_b=np.asarray(sigmoid_b),
    )
