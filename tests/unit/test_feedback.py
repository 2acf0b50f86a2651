"""Feedback rules that need no database: the caps on free text, the hash of `user`, which failures are retried,
and the refusal of SQLite behind several ingress replicas."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from chatforge.config import ServeSpec, SpecError
from chatforge.serve.api import ApiError, FeedbackRequest, parse_body
from chatforge.serve.app import prepare_spec
from chatforge.serve.feedback import AlreadyRated, UnknownCompletion, hash_user, is_transient
from chatforge.serve.metrics import STORE_WRITE_OUTCOMES, ServeMetrics


def feedback_request(**fields) -> FeedbackRequest:
    return FeedbackRequest.model_validate({"completion_id": "chatcmpl-1", "rating": 1, **fields})


@pytest.mark.parametrize(("field", "limit"), [("correction", 8000), ("comment", 2000)])
def test_correction_and_comment_over_their_caps_are_400s_naming_field_and_limit(field, limit):
    feedback_request(**{field: "x" * limit}).check_lengths(8000, 2000)  # at the cap: taken
    with pytest.raises(ApiError) as caught:
        feedback_request(**{field: "x" * (limit + 1)}).check_lengths(8000, 2000)
    error = caught.value
    assert (error.status, error.param, error.code) == (400, field, "string_too_long")
    assert f"'{field}'" in error.message and str(limit) in error.message and str(limit + 1) in error.message


def test_a_huge_correction_is_parsed_then_refused_not_a_crash():
    raw = b'{"completion_id": "c", "rating": -1, "correction": "' + b"y" * 500_000 + b'"}'
    with pytest.raises(ApiError) as caught:
        parse_body(FeedbackRequest, raw).check_lengths(8000, 2000)
    assert caught.value.status == 400 and caught.value.param == "correction"


def test_user_hash_is_keyed_stable_and_reveals_nothing():
    key, other_key = b"k" * 32, b"o" * 32
    hashed = hash_user("jane.doe@example.com", key)
    assert hashed == hash_user("jane.doe@example.com", key)  # one user's rows group together
    assert hashed != hash_user("jane.doe@example.com", other_key)  # without the key it cannot be recomputed
    assert hashed != hash_user("john.doe@example.com", key)
    assert hashed.startswith("u-") and len(hashed) == 18 and "jane" not in hashed
    int(hashed[2:], 16)
    assert hash_user(None, key) is None


def test_only_failures_that_may_pass_are_retried():
    locked = sa.exc.OperationalError("INSERT ...", {}, Exception("database is locked"))
    refused = sa.exc.IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed"))
    assert is_transient(locked)
    assert is_transient(sa.exc.TimeoutError("QueuePool limit reached"))
    assert is_transient(NotADirectoryError("runs/serve is a file"))
    for error in (refused, UnknownCompletion("c"), AlreadyRated("c"), ValueError("rating must be"), TypeError()):
        assert not is_transient(error), error


def test_write_error_metrics_work_without_ray():
    metrics = ServeMetrics()
    for outcome in STORE_WRITE_OUTCOMES:
        metrics.store_write_error("completion", outcome)
    metrics.store_queue(3)
    with pytest.raises(ValueError, match="outcome must be one of"):
        metrics.store_write_error("completion", "lost")


# ---------------------------------------------------------------- SQLite and several ingress replicas


def test_sqlite_with_several_ingress_replicas_is_refused_by_the_spec():
    with pytest.raises(ValidationError) as caught:
        ServeSpec.model_validate({"ingress_replicas": 2, "feedback": {"url": "sqlite:///f.db", "url_env": None}})
    message = str(caught.value)
    assert "serve.ingress_replicas is 2" in message and "serve.feedback.url" in message and "PostgreSQL" in message
    ServeSpec.model_validate({"ingress_replicas": 1, "feedback": {"url": "sqlite:///f.db", "url_env": None}})
    ServeSpec.model_validate({"ingress_replicas": 2, "feedback": {"url": "postgresql+psycopg://db/chat"}})


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")  # never loaded: prepare_spec only checks it is there
    return tmp_path


def test_sqlite_left_after_the_url_env_is_refused_where_the_app_is_built(model_dir, monkeypatch):
    spec = ServeSpec.model_validate(
        {
            "variants": [{"name": "a", "model": str(model_dir)}],
            "ingress_replicas": 3,
            "feedback": {"url": "sqlite:///unused.db", "url_env": "TEST_FEEDBACK_URL"},
        }
    )  # the env var may replace the URL, so the spec alone cannot tell
    monkeypatch.delenv("TEST_FEEDBACK_URL", raising=False)
    with pytest.raises(SpecError) as caught:
        prepare_spec(spec)
    assert "serve.ingress_replicas is 3" in str(caught.value) and "TEST_FEEDBACK_URL" in str(caught.value)
    monkeypatch.setenv("TEST_FEEDBACK_URL", "sqlite:////tmp/other.db")
    with pytest.raises(SpecError, match="SQLite"):
        prepare_spec(spec)
    monkeypatch.setenv("TEST_FEEDBACK_URL", "postgresql+psycopg://user:pw@db.internal/chat")
    assert prepare_spec(spec).ingress_replicas == 3
