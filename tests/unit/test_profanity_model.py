"""The profanity model shipped as plain arrays: the package's scores, read without unpickling or scikit-learn."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from chatforge.data.sources import chitchat_corpus_path
from chatforge.safety.profanity_model import load_profanity_model, save_profanity_model

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


def test_scores_what_the_package_scores():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a scikit-learn newer than the one that pickled the package's model
        from profanity_check import predict_prob

    model = load_profanity_model()
    texts = chitchat_texts(5000) + EDGE_CASES
    ours = model.predict_prob(texts)
    assert ours.shape == (len(texts),)
    np.testing.assert_allclose(
        ours,
        predict_prob(texts),
        rtol=0,
        atol=1e-12,
        err_msg=f"the shipped model ({model.source}) no longer matches the installed alt-profanity-check: "
        "rebuild it with benchmarks/profanity_model.py",
    )
    assert (ours > 0.5).sum() > 0 and (ours < 0.5).sum() > 0  # the corpus has both kinds
    assert model.predict_prob([]).shape == (0,)
    assert model.source.startswith("alt-profanity-check ") and "MIT License" in model.license


def test_loading_imports_neither_scikit_learn_nor_joblib():
    code = (
        "import sys; from chatforge.safety.profanity_model import load_profanity_model; "
        "p = load_profanity_model().predict_prob(['you are a fucking idiot', 'thank you']); "
        "print(round(float(p[0]), 3), round(float(p[1]), 3), *(m in sys.modules for m in ('sklearn', 'scipy', 'joblib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    rude, polite, *loaded = out
    assert float(rude) > 0.5 > float(polite)
    assert loaded == ["False", "False", "False"]


def test_a_file_holding_objects_is_refused(tmp_path):
    model = load_profanity_model()
    good = tmp_path / "model.npz"
    save_profanity_model(model, good)
    arrays = dict(np.load(good))
    arrays["source"] = np.array([{"would be": "unpickled"}], dtype=object)
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_profanity_model(tampered)


def test_saving_and_loading_keep_every_array_and_the_bytes_are_reproducible(tmp_path):
    model = load_profanity_model()
    save_profanity_model(model, tmp_path / "a.npz")
    save_profanity_model(load_profanity_model(tmp_path / "a.npz"), tmp_path / "b.npz")
    again = load_profanity_model(tmp_path / "b.npz")
    assert again.vocabulary == model.vocabulary and again.token_pattern.pattern == model.token_pattern.pattern
    for name in ("idf", "coef", "intercept", "sigmoid_a", "sigmoid_b"):
        np.testing.assert_array_equal(getattr(again, name), getattr(model, name))
    assert (again.source, again.license) == (model.source, model.license)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_a_file_of_another_shape_names_itself(tmp_path):
    save_profanity_model(load_profanity_model(), tmp_path / "model.npz")
    arrays = dict(np.load(tmp_path / "model.npz"))
    arrays["coef"] = arrays["coef"][:, :10]
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    with pytest.raises(ValueError, match="broken.npz: inconsistent shapes"):
        load_profanity_model(broken)
