"""Unit tests of the API layer without Ray: request validation into OpenAI errors, and build_app's args."""

from __future__ import annotations

import pytest

from chatforge.config import SpecError
from chatforge.serve.api import ApiError, ChatCompletionRequest, FeedbackRequest, parse_body
from chatforge.serve.app import load_serve_spec, prepare_spec


def test_a_valid_request_flattens_text_parts_and_ignores_unknown_fields():
    body = parse_body(
        ChatCompletionRequest,
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],'
        b' "stop": "x", "max_completion_tokens": 5, "presence_penalty": 1}',
    )
    assert body.plain_messages() == [{"role": "user", "content": "ab"}]
    assert body.stop_sequences() == ("x",) and body.requested_max_tokens() == 5


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b"{", None, "invalid_json"),
        (b'"text"', None, "invalid_type"),
        (b"{}", "messages", "missing_required_parameter"),
        (b'{"messages": [{"role": "user", "content": ["x"]}]}', "messages.0.content.0", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}', "logprobs", "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ""}', "stop", "invalid_value"),
    ],
)
def test_bad_bodies_name_the_field(raw, param, code):
    with pytest.raises(ApiError) as caught:
        parse_body(ChatCompletionRequest, raw)
    error = caught.value.body()["error"]
    assert caught.value.status == 400 and (error["param"], error["code"]) == (param, code)


def test_cross_field_rules():
    body = parse_body(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}')
    with pytest.raises(ApiError, match="logprobs"):
        body.validate_choices()


def test_feedback_rating_is_minus_one_zero_or_one():
    assert parse_body(FeedbackRequest, b'{"completion_id": "c", "rating": -1}').rating == -1
    with pytest.raises(ApiError) as caught:
        parse_body(FeedbackRequest, b'{"completion_id": "c", "rating": 2}')
    assert caught.value.param == "rating"


def test_build_app_args_errors_name_the_key(tmp_path):
    with pytest.raises(SpecError, match=r"variants\.0\.weigth: unknown key"):
        load_serve_spec({"variants": [{"name": "a", "model": "m", "weigth": 2}]})
    with pytest.raises(SpecError, match="only `overrides`"):
        load_serve_spec({"spec": "x.yaml", "port": 1})
    spec = tmp_path / "spec.yaml"
    spec.write_text("serve:\n  variants:\n    - {name: v1, model: nowhere}\n")
    loaded = load_serve_spec({"spec": str(spec), "overrides": ["serve.max_messages=3"]})
    assert loaded.max_messages == 3 and loaded.variants[0].name == "v1"
    with pytest.raises(SpecError, match=r"\(v1\)\.model: .*nowhere.*config\.json"):
        prepare_spec(loaded)
