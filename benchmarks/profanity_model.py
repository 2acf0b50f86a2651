"""Builds chatforge's profanity model file from alt-profanity-check's, and measures it against the package.

    .venv/bin/python benchmarks/profanity_model.py --json           # rebuild, then compare (~30 s on 2 cores)
    .venv/bin/python benchmarks/profanity_model.py --json --check   # compare the shipped file only

Source: the model inside the alt-profanity-check wheel (PyPI, MIT licence; https://github.com/dimitrismistriotis/
alt-profanity-check), `profanity_check/data/{vectorizer,model}.joblib`: a TF-IDF vectorizer and a
`CalibratedClassifierCV` of linear SVMs with sigmoid calibration, trained by the package's authors on ~200k
labelled strings, published per scikit-learn version. This script unpickles those two files through the package
itself (trusted here: the package's own files, on the maintainer's machine), refuses estimators of any other kind
or with other settings, takes the arrays prediction needs (vocabulary, idf, each fold's coefficients, intercept and
sigmoid), and writes `platform/chatforge/safety/profanity_model.npz` with the package's version and licence in it.

Before writing, and with ``--check`` instead of writing, it scores every turn of the chitchat corpus (the
`chitchat-dataset` package) both ways: `chatforge.safety.profanity_model` on the arrays and the package's own
`predict_prob`. It writes nothing when they differ by more than 1e-12. Prints a JSON object (with ``--json``, one
line, last): the source version, words, folds, texts compared, the largest absolute difference, and the seconds to
load each way.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "platform", "chatforge", "safety", "profanity_model.npz")
TOLERANCE = 1e-12

# The vectorizer settings `LinearProfanityModel.predict_prob` computes.
VECTORIZER_SETTINGS = {
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
    "dtype": np.float64,
}


def package_model():
    """alt-profanity-check's vectorizer, classifier and `predict_prob`, as the package loads them."""
    with warnings.catch_warnings():
        # a scikit-learn newer than the one that pickled the model warns; the comparison below is what counts
        warnings.simplefilter("ignore")
        from profanity_check import predict_prob, profanity_check
    return profanity_check.vectorizer, profanity_check.model, predict_prob


def convert(vectorizer, model, source: str, license: str):
    """The fitted estimators' arrays as a `LinearProfanityModel`; ValueError for estimators of another kind."""
    from chatforge.safety.profanity_model import LinearProfanityModel

    differs = {key: got for key, want in VECTORIZER_SETTINGS.items() if (got := vectorizer.get_params()[key]) != want}
    if type(vectorizer).__name__ != "TfidfVectorizer" or differs:
        raise ValueError(f"vectorizer {type(vectorizer).__name__} with {differs}: not what chatforge computes")
    if type(model).__name__ != "CalibratedClassifierCV" or model.method != "sigmoid" or list(model.classes_) != [0, 1]:
        raise ValueError(f"classifier {type(model).__name__} (method {model.method!r}): not what chatforge computes")
    coef, intercept, sigmoid_a, sigmoid_b = [], [], [], []
    for fold in model.calibrated_classifiers_:
        estimator, calibrators = fold.estimator, fold.calibrators
        if type(estimator).__name__ != "LinearSVC" or len(calibrators) != 1:
            raise ValueError(f"calibrated {type(estimator).__name__} with {len(calibrators)} calibrators")
        coef.append(np.asarray(estimator.coef_, np.float64).reshape(-1))
        intercept.append(float(np.asarray(estimator.intercept_).reshape(-1)[0]))
        sigmoid_a.append(float(calibrators[0].a_))
        sigmoid_b.append(float(calibrators[0].b_))
    return LinearProfanityModel(
        token_pattern=re.compile(vectorizer.token_pattern),
        vocabulary={str(word): int(column) for word, column in vectorizer.vocabulary_.items()},
        idf=np.asarray(vectorizer.idf_, np.float64),
        coef=np.stack(coef),
        intercept=np.asarray(intercept),
        sigmoid_a=np.asarray(sigmoid_a),
        sigmoid_b=np.asarray(sigmoid_b),
        source=source,
        license=license,
    )


def package_source() -> tuple[str, str]:
    """The installed package's name, version and model files' digests; and its licence text."""
    distribution = importlib.metadata.distribution("alt-profanity-check")
    digests = []
    for name in ("vectorizer.joblib", "model.joblib"):
        data = distribution.locate_file(f"profanity_check/data/{name}").read_bytes()
        digests.append(f"{name} sha256 {hashlib.sha256(data).hexdigest()}")
    licence = distribution.read_text("licenses/LICENSE") or distribution.read_text("LICENSE") or ""
    return f"alt-profanity-check {distribution.version} ({', '.join(digests)})", licence


def chitchat_turns() -> list[str]:
    """Every message of the chitchat corpus, as the `chitchat-dataset` package ships it."""
    from chatforge.data.sources import chitchat_corpus_path

    with open(chitchat_corpus_path(), encoding="utf-8") as handle:
        chats = json.load(handle)
    return [message["text"] for chat in chats.values() for turn in chat["messages"] for message in turn]


def import_seconds(statement: str) -> float:
    """Seconds for ``statement`` (an import and a load) in a fresh interpreter."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON result, as one line")
    parser.add_argument("--check", action="store_true", help="compare the shipped file; write nothing")
    args = parser.parse_args()

    from chatforge.safety.profanity_model import load_profanity_model, save_profanity_model

    vectorizer, model, predict_prob = package_model()
    source, licence = package_source()
    ours = load_profanity_model() if args.check else convert(vectorizer, model, source, licence)
    texts = chitchat_turns()
    difference = float(np.max(np.abs(ours.predict_prob(texts) - predict_prob(texts))))
    if difference > TOLERANCE:
        sys.exit(f"the arrays score up to {difference:.3g} away from the package's predict_prob; nothing written")
    if not args.check:
        save_profanity_model(ours, OUTPUT)
    result = {
        "source": ours.source,
        "package_installed": source,
        "words": len(ours.vocabulary),
        "folds": len(ours.intercept),
        "texts": len(texts),
        "max_abs_diff": difference,
        "file_bytes": os.path.getsize(OUTPUT),
        "load_seconds_npz": round(
            import_seconds("from chatforge.safety.profanity_model import load_profanity_model; load_profanity_model()"),
            3,
        ),
        "load_seconds_package": round(
            import_seconds("import warnings; warnings.simplefilter('ignore'); import profanity_check"), 3
        ),
        "written": None if args.check else os.path.relpath(OUTPUT, ROOT),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
