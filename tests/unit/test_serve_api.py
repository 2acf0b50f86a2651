"""Unit tests of the API layer without Ray: request validation into OpenAI errors, deadlines and overload, and
build_app's args."""

from __future__ import annotations

import asyncio
import json

import pytest

from chatforge.config import EngineSpec, SpecError
from chatforge.serve.api import MAX_STOP_CHARS, ApiError, ChatCompletionRequest, FeedbackRequest, parse_body
from chatforge.serve.app import build_app, http_options, load_serve_spec, prepare_spec, until


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
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}',
            "stop",
            "invalid_value",
        ),
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


def test_a_model_dir_without_its_weights_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # what an export that stopped midway can leave
    spec = load_serve_spec({"variants": [{"name": "v1", "model": str(tmp_path)}]})
    with pytest.raises(SpecError, match=rf"\(v1\)\.model: {tmp_path} has a config.json but no weights"):
        prepare_spec(spec)
    (tmp_path / "model.safetensors.index.json").write_text("{}")  # a sharded export names its shards here
    assert prepare_spec(spec).variants[0].model == str(tmp_path)


def test_stop_strings_are_capped_in_length():
    def ask(stop) -> ChatCompletionRequest:
        return parse_body(
            ChatCompletionRequest, json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": stop})
        )

    assert ask(["x" * MAX_STOP_CHARS] * 4).stop_sequences() == ("x" * MAX_STOP_CHARS,) * 4
    for stop in ("x" * (MAX_STOP_CHARS + 1), ["ok", "y" * 250_000]):
        with pytest.raises(ApiError) as caught:
            ask(stop)
        assert caught.value.status == 400 and caught.value.param == "stop"
        assert f"at most {MAX_STOP_CHARS} characters" in caught.value.message


def test_engine_spec_default_max_tokens_within_the_limit():
    assert EngineSpec(default_max_tokens=64, max_tokens_limit=64).default_max_tokens == 64
    with pytest.raises(ValueError, match=r"default_max_tokens \(300\) exceeds max_tokens_limit \(256\)"):
        EngineSpec(default_max_tokens=300, max_tokens_limit=256)
    with pytest.raises(SpecError, match="default_max_tokens"):
        load_serve_spec({"variants": [{"name": "a", "model": "m", "engine": {"max_tokens_limit": 8}}]})


# ---------------------------------------------------------------- deadlines, disconnects, overload


def wait_until(work, deadline_in: float = 30.0, timeout_s: float = 30.0):
    """Run ``until`` on ``work`` (a coroutine function) in a fresh loop; returns (outcome, cancel calls)."""
    cancelled: list[bool] = []

    async def run():
        loop = asyncio.get_running_loop()
        return await until(loop.time() + deadline_in, work(), lambda: cancelled.append(True), timeout_s)

    try:
        return asyncio.run(run()), cancelled
    except ApiError as error:
        return error, cancelled


async def forever():
    await asyncio.Event().wait()


def test_the_deadline_is_a_503_and_cancels_the_generation():
    error, cancelled = wait_until(forever, deadline_in=0.05, timeout_s=0.05)
    assert isinstance(error, ApiError) and error.status == 503 and error.code == "timeout"
    assert error.type == "server_error" and "0.05 s" in error.message
    assert cancelled == [True]


def test_a_client_leaving_cancels_the_generation():
    cancelled = []

    async def run():
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(until(loop.time() + 30, forever(), lambda: cancelled.append(True), 30))
        await asyncio.sleep(0.01)
        waiting.cancel()  # what Serve does to the request when its client disconnects
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(run())
    assert cancelled == [True]


def test_overload_and_missing_replicas_are_503s_with_openai_bodies():
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    async def full_queue():
        raise BackPressureError(num_queued_requests=9, max_queued_requests=8)

    async def failed_deployment():
        raise DeploymentUnavailableError("chatforge#alpha")

    async def answer():
        return "done"

    error, cancelled = wait_until(full_queue)
    assert (error.status, error.code, cancelled) == (503, "overloaded", [])
    response = error.response()
    assert response.headers["retry-after"] == "1"
    assert set(json.loads(response.body)["error"]) == {"message", "type", "param", "code"}
    error, _ = wait_until(failed_deployment)
    assert (error.status, error.code) == (503, "unavailable")
    assert wait_until(answer) == ("done", [])


# ---------------------------------------------------------------- build_app


def test_build_app_refuses_to_build_without_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("CHATFORGE_API_KEYS", raising=False)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")  # never loaded: the build stops before any replica
    args = {"variants": [{"name": "a", "model": str(tmp_path)}], "feedback": {"url": "sqlite:///:memory:"}}
    with pytest.raises(SpecError, match="no API key is configured"):
        build_app(args)
    # anonymous, but no Serve running here to say where it binds: unknown is refused, never taken for loopback
    with pytest.raises(SpecError, match="cannot be told"):
        build_app({**args, "auth": {"anonymous": True}})


def test_proxy_timeout_comes_after_the_ingress_deadline():
    spec = load_serve_spec({"request_timeout_s": 30, "host": "127.0.0.1", "port": 8123})
    options = http_options(spec)
    assert options["host"] == "127.0.0.1" and options["port"] == 8123 and options["request_timeout_s"] > 30
