"""alt-profanity-check's model read without scikit-learn: the same scores, a refusing unpickler, a fallback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings

import joblib
import numpy as np
import pytest

from chatforge.data import profanity_model, toxicity
from chatforge.data.profanity_model import UnsupportedModel, load_linear_model
from chatforge.data.sources import chitchat_corpus_path

EDGE_CASES = [
    "",
    "   ",
    "!!! ??? ...",
    "a b c",  # one-letter words are no tokens
    "the and of it",  # stop words only
    "you are a fucking idiot",
    "FUCK THIS",
    "Ünïcödé shit, naïve café",
    "x" * 5000,
    "idiot " * 300,
    "call me at 555-0100, user@example.com",
]


def chitchat_texts(limit: int) -> list[str]:
    """Real chat lines from the corpus package (what the quickstart scores)."""
    with open(chitchat_corpus_path(), encoding="utf-8") as f:
        chats = json.load(f)
    texts: list[str] = []
    for chat in chats.values():
        texts.extend(message["text"] for turn in chat["messages"] for message in turn)
        if len(texts) >= limit:
            break
    return texts[:limit]


def package_predict_prob():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from profanity_check import predict_prob
    return predict_prob


def test_scores_what_the_package_scores():
    texts = chitchat_texts(5000) + EDGE_CASES
    ours = load_linear_model().predict_prob(texts)
    theirs = package_predict_prob()(texts)
    assert ours.shape == (len(texts),)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert (ours > 0.5).sum() > 0 and (ours < 0.5).sum() > 0  # the corpus has both kinds
    assert load_linear_model().predict_prob([]).shape == (0,)


def test_loading_does_not_import_scikit_learn():
    code = (
        "import sys; from chatforge.data.profanity_model import load_linear_model; "
        "p = load_linear_model().predict_prob(['you are a fucking idiot', 'thank you']); "
        "print(round(float(p[0]), 3), round(float(p[1]), 3), 'sklearn' in sys.modules, 'scipy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    rude, polite, sklearn_loaded, scipy_loaded = out
    assert float(rude) > 0.5 > float(polite)
    assert sklearn_loaded == "False" and scipy_loaded == "False"


def fit_model(tmp_path, **vectorizer_options):
    """A TF-IDF + sigmoid-calibrated LinearSVC fitted here and saved as the package saves its own."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    texts = chitchat_texts(400)
    labels = np.array([int("you" in text.lower()) for text in texts])  # any learnable split will do
    vectorizer = TfidfVectorizer(stop_words="english", **vectorizer_options)
    model = CalibratedClassifierCV(LinearSVC(), method="sigmoid", cv=3).fit(vectorizer.fit_transform(texts), labels)
    joblib.dump(vectorizer, tmp_path / "vectorizer.joblib")
    joblib.dump(model, tmp_path / "model.joblib")
    return texts, vectorizer, model


def test_any_model_of_the_supported_kind_scores_as_scikit_learn(tmp_path):
    texts, vectorizer, model = fit_model(tmp_path)
    texts = texts + EDGE_CASES
    expected = model.predict_proba(vectorizer.transform(texts))[:, 1]
    np.testing.assert_allclose(load_linear_model(str(tmp_path)).predict_prob(texts), expected, rtol=0, atol=1e-12)


def test_a_model_of_another_kind_is_unsupported(tmp_path):
    fit_model(tmp_path, ngram_range=(1, 2))
    with pytest.raises(UnsupportedModel, match="ngram_range"):
        load_linear_model(str(tmp_path))


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_the_unpickler_refuses_anything_but_estimators_and_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    joblib.dump(RunsACommand(), tmp_path / "vectorizer.joblib")
    joblib.dump({"weights": np.arange(3)}, tmp_path / "model.joblib")
    with pytest.raises(Exception, match="refusing posix.system"):
        load_linear_model(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_the_scorer_uses_the_package_when_the_model_is_of_another_kind(monkeypatch, caplog):
    def unsupported(data_dir=None):
        raise UnsupportedModel("vectorizer TfidfVectorizer with {'ngram_range': (1, 2)}")

    monkeypatch.setattr(profanity_model, "load_linear_model", unsupported)
    with caplog.at_level(logging.WARNING, logger=toxicity.__name__):
        scorer = toxicity.ProfanityScorer()
    assert "read through scikit-learn" in caplog.text and "ngram_range" in caplog.text
    insult, polite = scorer.score(["you are a fucking idiot", "thank you, have a nice day"])
    assert insult["toxicity"] > 0.5 > polite["toxicity"]
