"""The condition step's endpoint client: what it sends, which answers keep a turn, which it retries, which stop the
step and what they say. The server side is an httpx transport here; tests/e2e/test_condition_endpoint.py curates
against a real `chatforge serve`."""

import asyncio
import json

import httpx
import pytest
from pydantic import ValidationError

from chatforge.config import ConditionSpec, CurateSpec
from chatforge.data.condition import ConditionActor, EndpointAnswers, EndpointError

MESSAGES = [{"role": "user", "content": "hi"}]


def spec(**endpoint):
    return ConditionSpec(
        endpoint={"url": "http://model.test/v1/", "retries": 2, **endpoint}, max_new_tokens=7, temperature=0
    )


def ask(answers: EndpointAnswers, messages=MESSAGES, seed=3):
    async def go():
        async with answers:
            return await answers.answer(messages, seed)

    return asyncio.run(go())


def openai_answer(text: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


def test_the_request_carries_the_spec_and_the_key(monkeypatch):
    monkeypatch.setenv("CHATFORGE_CONDITION_API_KEY", "k-123")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return openai_answer("hello back")

    answers = EndpointAnswers(spec(model="tuned"), transport=httpx.MockTransport(handler))
    assert ask(answers) == "hello back"
    (request,) = seen
    assert str(request.url) == "http://model.test/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k-123"
    body = json.loads(request.content)
    assert body == {"messages": MESSAGES, "max_tokens": 7, "temperature": 0.0, "top_p": 0.95, "seed": 3,
                    "model": "tuned"}  # fmt: skip


def test_no_key_in_the_env_sends_no_header(monkeypatch):
    monkeypatch.delenv("CHATFORGE_CONDITION_API_KEY", raising=False)
    seen = []
    transport = httpx.MockTransport(lambda request: seen.append(request) or openai_answer("ok"))
    assert ask(EndpointAnswers(spec(), transport=transport)) == "ok"
    assert "authorization" not in seen[0].headers and "model" not in json.loads(seen[0].content)


def test_busy_and_failing_servers_are_asked_again_then_the_step_stops():
    statuses = iter([503, 429, 200])
    calls = []

    def flaky(request):
        calls.append(1)
        status = next(statuses)
        return openai_answer("at last") if status == 200 else httpx.Response(status, text="busy")

    assert ask(EndpointAnswers(spec(), transport=httpx.MockTransport(flaky))) == "at last"
    assert len(calls) == 3

    down = httpx.MockTransport(lambda request: httpx.Response(502, text="bad gateway"))
    with pytest.raises(EndpointError, match=r"http://model.test/v1/chat/completions answered 502: bad gateway"):
        ask(EndpointAnswers(spec(retries=1), transport=down))


def test_an_unreachable_server_names_the_url():
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    with pytest.raises(
        EndpointError, match=r"model.test/v1/chat/completions: ConnectError.*after 1 retries.*server up"
    ):
        ask(EndpointAnswers(spec(retries=1), transport=httpx.MockTransport(refuse)))


def test_a_conversation_the_model_refuses_keeps_its_turn_a_bad_setting_stops_the_step():
    def too_long(request):
        error = {"message": "This model's maximum context length is 64 tokens", "param": "messages"}
        return httpx.Response(400, json={"error": error})

    assert ask(EndpointAnswers(spec(), transport=httpx.MockTransport(too_long))) is None

    def over_limit(request):
        error = {"message": "Invalid value for 'max_tokens': 7 is over this model's limit of 4.", "param": "max_tokens"}
        return httpx.Response(400, json={"error": error})

    with pytest.raises(EndpointError, match=r"answered 400: .*max_tokens.*come from curate.condition"):
        ask(EndpointAnswers(spec(), transport=httpx.MockTransport(over_limit)))


def test_a_refused_key_says_which_env_var_to_set(monkeypatch):
    monkeypatch.setenv("TEAM_KEY", "wrong")
    refused = httpx.MockTransport(lambda request: httpx.Response(401, json={"error": {"message": "Invalid API key"}}))
    with pytest.raises(EndpointError, match=r"answered 401.*set TEAM_KEY to a key it accepts"):
        ask(EndpointAnswers(spec(api_key_env="TEAM_KEY"), transport=refused))
    missing = httpx.MockTransport(lambda request: httpx.Response(404, text="Not Found"))
    with pytest.raises(EndpointError, match=r"answered 404.*check curate.condition.endpoint.url"):
        ask(EndpointAnswers(spec(), transport=missing))


def test_the_actor_answers_rounds_through_the_endpoint():
    """Turn k's prompt holds the answer given for turn k-1: the rounds hold with an endpoint too."""
    prompts = []

    def echo(request):
        messages = json.loads(request.content)["messages"]
        prompts.append(messages)
        return openai_answer(f"regenerated after {len(messages)}")

    actor = ConditionActor(spec())
    actor.answers.transport = httpx.MockTransport(echo)
    turns = ["u0", "a0", "u1", "a1", "u2", "a2"]
    record = {
        "id": "r1",
        "messages": [{"role": "user" if t[0] == "u" else "assistant", "content": t} for t in turns],
        "dropped": None,
        "meta": None,
    }
    (out,) = asyncio.run(actor.condition([record]))
    assert [m["content"] for m in out["messages"]] == ["u0", "regenerated after 1", "u1", "regenerated after 3",
                                                       "u2", "a2"]  # fmt: skip
    assert prompts[1][1]["content"] == "regenerated after 1"
    assert out["conditioned"] == {"regenerated": 2, "kept": 0}
    assert json.loads(out["meta"])["conditioned_from"] == {"1": "a0", "3": "a1"}


def test_the_spec_takes_a_model_or_an_endpoint():
    assert spec().actor_cpus == 0.25 and ConditionSpec(model="m").actor_cpus == 1.0
    assert ConditionSpec(model="m", num_cpus=2).actor_cpus == 2
    with pytest.raises(ValidationError, match="both model and endpoint"):
        ConditionSpec(model="m", endpoint={"url": "http://x/v1"})
    with pytest.raises(ValidationError, match="must be an http"):
        ConditionSpec(endpoint={"url": "model.test/v1"})
    CurateSpec(steps=["normalize", "condition"], condition={"endpoint": {"url": "http://x/v1"}})


RAY_DATA_TRACEBACK = """\x1b[36mray::MapWorker(MapBatches(ConditionActor)).submit()\x1b[39m (pid=9223, ip=192.0.2.2)
  File "/usr/lib/python3.11/concurrent/futures/thread.py", line 58, in run
    result = self.fn(*self.args, **self.kwargs)
             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "platform/chatforge/data/condition.py", line 163, in answer
    raise self._refused(response)
chatforge.data.condition.EndpointError: http://h/v1/chat/completions answered 401: no; set KEY

The above exception was the direct cause of the following exception:

ray::MapWorker(MapBatches(ConditionActor)).submit() (pid=9223, ip=192.0.2.2)
ray.exceptions.UserCodeException: UDF failed to process a data block.
Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).
"""


def test_a_failed_steps_own_error_is_what_the_cli_says():
    """Ray Data wraps a UDF's exception in a UserCodeException whose cause does not survive the trip to the driver;
    the traceback text holds it."""
    from ray.exceptions import UserCodeException

    from chatforge.runtime import cause_line, udf_error_text

    assert udf_error_text(RAY_DATA_TRACEBACK) == "EndpointError: http://h/v1/chat/completions answered 401: no; set KEY"
    assert udf_error_text("no traceback here") is None

    class Wrapped(Exception):
        cause = UserCodeException("UDF failed to process a data block.")

        def __str__(self):
            return RAY_DATA_TRACEBACK

    assert cause_line(Wrapped()).startswith("EndpointError: http://h/v1/chat/completions answered 401")
    assert cause_line(ValueError("first\nlast line")) == "ValueError: last line"
