"""The Serve application end to end over HTTP: the official OpenAI client, bad input, A/B, guard, feedback, metrics,
auth that fails closed, deadlines, overload and disconnects.

One Serve app for the module on a 2-CPU Ray: two variants (alpha, beta; 50/50) of a tiny random-weights model, a
third one (long; weight 0, asked for by name) with a 1024-token window and a tiny queue for the overload and
cancellation tests, the input guard blocking, API keys from a digest file and from an env var that only the
driver has (the replicas get digests), a SQLite feedback store in a temp dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chatforge.serve.auth import key_digest
from helpers.network import free_port
from helpers.tiny_model import save_tiny_model

pytestmark = pytest.mark.integration

FILE_KEY = "sk-test-from-digest-file"
ENV_KEY = "sk-test-from-env"
TOXIC = "shut up you stupid fucking idiot"
HELLO = [{"role": "user", "content": "hello, how are the gardens today?"}]
RIVERS = [{"role": "user", "content": "tell me about rivers"}]  # the long variant answers it greedily without stopping
LONG = 900  # tokens asked of the long variant: about a second of generation on one CPU thread


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from chatforge.serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    model = save_tiny_model(root / "model", n_positions=128)
    long_model = save_tiny_model(root / "long-model", n_positions=1024)
    keys_file = root / "keys.sha256"
    keys_file.write_text(f"# test keys\n{key_digest(FILE_KEY)}  test\n")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112 (a Ray config name)
    os.environ["RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT"] = "1"  # an ingress meant to refuse fails once, not thrice
    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    os.environ["CHATFORGE_TEST_KEYS"] = ENV_KEY  # after ray.init: only here, where build_app runs, not in replicas
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    engine = {"max_batch_size": 8, "default_max_tokens": 16, "max_tokens_limit": 64}
    variant = {"model": str(model), "weight": 50, "engine": engine, "num_cpus": 0.4, "max_ongoing_requests": 32}
    long = {
        "name": "long",
        "model": str(long_model),
        "weight": 0,
        "engine": {"max_batch_size": 2, "default_max_tokens": 16, "max_tokens_limit": LONG},
        "num_cpus": 0.4,
        "max_ongoing_requests": 2,
        "max_queued_requests": 2,
    }
    db = root / "feedback.db"
    args = {
        "variants": [{"name": "alpha", **variant}, {"name": "beta", **variant}, long],
        "guard": {"input_policy": "block", "output_policy": "flag"},
        "auth": {"api_keys_env": "CHATFORGE_TEST_KEYS", "api_keys_file": str(keys_file)},
        "feedback": {"url": f"sqlite:///{db}", "url_env": None},
        "max_body_bytes": 1 << 20,
        "ingress_num_cpus": 0.25,
    }
    serve.run(build_app(args), name="chatforge", route_prefix="/")
    url = f"http://127.0.0.1:{http_port}"
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {FILE_KEY}"}) as http:
        yield SimpleNamespace(url=url, http=http, db=db, metrics_port=metrics_port, args=args)
    serve.shutdown()
    ray.shutdown()
    os.environ.pop("CHATFORGE_TEST_KEYS", None)
    os.environ.pop("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", None)


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served.url}/v1", api_key=FILE_KEY, max_retries=0, timeout=120)


def rows(db, query: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(query, params).fetchall()


def stored(db, query: str, *params, count: int = 1) -> list[tuple]:
    """The rows of ``query`` once there are ``count`` of them: the ingress writes in the background (and a store
    that was down may not have its file or tables yet)."""
    deadline, found, why = time.monotonic() + 60, [], "no database file"
    while len(found) < count:
        if Path(db).exists():
            try:
                found, why = rows(db, query, *params), "too few rows"
            except sqlite3.OperationalError as error:
                why = str(error)
        if len(found) < count:
            assert time.monotonic() < deadline, f"not stored within 60 s ({why}): {query} {params}"
            time.sleep(0.2)
    return found


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---------------------------------------------------------------- the OpenAI client


def test_openai_client_completion_names_its_variant(client):
    raw = client.chat.completions.with_raw_response.create(model="alpha", messages=HELLO, max_tokens=8, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-chatforge-variant"] == "alpha" == completion.model
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    again = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic
    assert again.id != completion.id


def test_openai_client_streaming_matches_the_plain_answer(client, served):
    kwargs = {"model": "beta", "messages": HELLO, "max_tokens": 12, "temperature": 0}
    plain = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "beta" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # the wire format: SSE events, the last one [DONE]; the completion is stored by then
    with served.http.stream("POST", "/v1/chat/completions", json={**kwargs, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    stream_id = json.loads(events[0][6:])["id"]
    assert stored(served.db, "SELECT stream, variant FROM completions WHERE id = ?", stream_id) == [(1, "beta")]


def test_a_stream_cut_by_the_client_is_stored_with_the_tokens_generated_up_to_the_cut(served, client):
    """The long variant would answer LONG tokens; the client reads 3 content chunks and closes the connection."""
    before = generated()
    body = {"model": "long", "messages": RIVERS, "max_tokens": LONG, "temperature": 0, "stream": True}
    chunks = []
    with served.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[len("data: ") :]))
            if sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) == 3:
                break
    received = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    # the ingress stores what it sent and the tokens generated for it, and cancels the sequence
    ((streamed, tokens, answer),) = stored(
        served.db, "SELECT stream, completion_tokens, answer FROM completions WHERE id = ?", chunks[0]["id"]
    )
    spent = generated() - before  # the engine's own count, cut included
    assert streamed == 1 and answer.startswith(received)
    assert 3 <= tokens <= spent < LONG / 2, (tokens, spent)
    after = client.chat.completions.create(model="long", messages=HELLO, max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_logprobs(client):
    completion = client.chat.completions.create(
        model="alpha", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        values = [alt.logprob for alt in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert abs(item.logprob - values[0]) < 1e-4  # greedy picks the most likely token
    plain = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_models_list(client):
    assert sorted(m.id for m in client.models.list()) == ["alpha", "beta", "long"]


def test_stop_sequence_and_max_completion_tokens(served):
    base = {"model": "alpha", "messages": HELLO, "temperature": 0}
    full = served.http.post("/v1/chat/completions", json={**base, "max_completion_tokens": 20}).json()
    text = full["choices"][0]["message"]["content"]
    assert full["usage"]["completion_tokens"] <= 20
    if len(text) > 4:
        stop = text[2:4]
        cut = served.http.post("/v1/chat/completions", json={**base, "max_tokens": 20, "stop": [stop]}).json()
        assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- feedback


def test_feedback_is_stored_and_joins_its_scrubbed_completion(served):
    messages = [{"role": "user", "content": "write to me at jane.doe@example.com about the roses"}]
    completion = served.http.post("/v1/chat/completions", json={"messages": messages, "user": "u-feedback"}).json()
    cid = completion["id"]
    posted = served.http.post(
        "/v1/feedback",
        json={
            "completion_id": cid,
            "rating": -1,
            "correction": "Roses need sun.",
            "comment": "meh",
            "user": "u-feedback",
        },
    )
    assert posted.status_code == 200, posted.text
    assert posted.json()["completion_id"] == cid and posted.json()["id"].startswith("feedback-")
    joined = stored(
        served.db,
        "SELECT c.variant, c.user, c.prompt, c.guard, c.completion_tokens, f.rating, f.correction, f.comment, "
        "f.user, f.public_id, c.key_id, f.key_id FROM completions c JOIN feedback f ON f.completion_id = c.id "
        "WHERE c.id = ?",
        cid,
    )
    assert len(joined) == 1
    variant, user, prompt, guard, tokens, rating, correction, comment, rater, public_id, *key_ids = joined[0]
    assert variant == completion["model"] and guard in ("pass", "flagged")
    assert tokens == completion["usage"]["completion_tokens"]
    assert (rating, correction, comment, public_id) == (-1, "Roses need sun.", "meh", posted.json()["id"])
    assert "jane.doe@example.com" not in prompt and "roses" in prompt
    # `user` is kept only as a keyed hash, the same in both tables; the key id is the one that asked
    assert user == rater and user.startswith("u-") and "feedback" not in user
    assert key_ids == [key_digest(FILE_KEY)[:12]] * 2


def test_a_completion_takes_one_rating_and_only_from_the_key_that_asked(served):
    cid = served.http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()["id"]
    first = served.http.post("/v1/feedback", json={"completion_id": cid, "rating": 1})
    assert first.status_code == 200, first.text
    again = served.http.post("/v1/feedback", json={"completion_id": cid, "rating": -1})
    assert again.status_code == 409
    assert error_of(again)["code"] == "already_rated" and error_of(again)["param"] == "completion_id"
    # another key learns nothing: its answer is the one an id that never existed gets
    other = httpx.post(
        f"{served.url}/v1/feedback",
        json={"completion_id": cid, "rating": -1},
        headers={"Authorization": f"Bearer {ENV_KEY}"},
        timeout=30,
    )
    unknown = served.http.post("/v1/feedback", json={"completion_id": "chatcmpl-nope", "rating": 1})
    assert other.status_code == unknown.status_code == 404
    assert error_of(other) == {
        **error_of(unknown),
        "message": error_of(unknown)["message"].replace("chatcmpl-nope", cid),
    }
    assert stored(served.db, "SELECT rating FROM feedback WHERE completion_id = ?", cid) == [(1,)]


@pytest.mark.parametrize(("field", "limit"), [("correction", 8000), ("comment", 2000)])
def test_feedback_text_over_its_cap_is_a_400_naming_the_field_and_the_limit(served, field, limit):
    cid = served.http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()["id"]
    for size in (limit + 1, 900_000):  # just over, and near max_body_bytes
        response = served.http.post("/v1/feedback", json={"completion_id": cid, "rating": 1, field: "z" * size})
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["param"] == field and error["code"] == "string_too_long"
        assert str(limit) in error["message"] and str(size) in error["message"]
    assert (
        served.http.post("/v1/feedback", json={"completion_id": cid, "rating": 1, field: "z" * limit}).status_code
        == 200
    )


def test_a_locked_database_delays_no_answer_and_loses_no_write(served):
    """Another process holds SQLite's write lock while a completion is asked for and rated: both are answered
    (before the lock goes, so without any write), and both rows land once it goes."""
    holder = sqlite3.connect(served.db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        completion = served.http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert completion.status_code == 200
        cid = completion.json()["id"]
        rated = served.http.post("/v1/feedback", json={"completion_id": cid, "rating": 0, "comment": "locked"})
        assert rated.status_code == 200, rated.text
        assert rows(served.db, "SELECT id FROM completions WHERE id = ?", cid) == []  # nothing written yet
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert stored(served.db, "SELECT comment FROM feedback WHERE completion_id = ?", cid) == [("locked",)]


@pytest.fixture(scope="module")
def store_down(served, tmp_path_factory):
    """A second ingress on the same variant replicas, whose SQLite store cannot be opened when it starts: a file
    stands where the store's directory should be."""
    from ray import serve

    from chatforge.config import ServeSpec
    from chatforge.serve.app import ChatIngress

    blocker = tmp_path_factory.mktemp("store-down") / "runs"
    blocker.write_text("not a directory")
    spec = ServeSpec.model_validate(
        {**served.args, "feedback": {"url": f"sqlite:///{blocker}/feedback.db", "url_env": None}}
    )
    models = {"alpha": serve.get_deployment_handle("alpha", app_name="chatforge")}
    ingress = ChatIngress.options(name="store-down-ingress", ray_actor_options={"num_cpus": 0.1})
    serve.run(ingress.bind(spec, models, [key_digest(FILE_KEY)]), name="store-down", route_prefix="/store-down")
    yield SimpleNamespace(url=f"{served.url}/store-down", blocker=blocker, db=blocker / "feedback.db")
    serve.delete("store-down")


def test_a_store_down_at_start_takes_nothing_down_and_loses_nothing(served, store_down):
    # the ingress started (serve.run returned) with its store unreachable; the API answers
    asked = served.http.post(f"{store_down.url}/v1/chat/completions", json={"model": "alpha", "messages": HELLO})
    assert asked.status_code == 200, asked.text
    cid = asked.json()["id"]
    rated = served.http.post(f"{store_down.url}/v1/feedback", json={"completion_id": cid, "rating": 1})
    assert rated.status_code == 200, rated.text  # right after its completion, which is still queued
    again = served.http.post(f"{store_down.url}/v1/feedback", json={"completion_id": cid, "rating": 1})
    assert again.status_code == 409
    health = served.http.get(f"{store_down.url}/healthz").json()
    assert health["status"] == "ok" and health["store"]["status"] == "degraded" and health["store"]["queued"] >= 2
    assert httpx.get(f"{store_down.url}/healthz", timeout=30).json() == {"status": "ok"}  # no key: nothing more

    wanted = ["ray_chatforge_feedback_write_errors_total{", "ray_chatforge_feedback_queue_depth{"]
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    retries = [
        line
        for line in text.splitlines()
        if line.startswith(wanted[0]) and 'outcome="retry"' in line and 'record="schema"' in line
    ]
    assert retries and float(retries[0].rsplit(" ", 1)[1]) >= 1, text[-2000:]
    assert any(line.startswith(wanted[1]) for line in text.splitlines())

    store_down.blocker.unlink()  # the store comes back: everything queued lands, in order
    assert stored(store_down.db, "SELECT rating FROM feedback WHERE completion_id = ?", cid) == [(1,)]
    assert rows(store_down.db, "SELECT id FROM completions") == [(cid,)]
    deadline = time.monotonic() + 60
    while (health := served.http.get(f"{store_down.url}/healthz").json())["store"]["status"] != "ok":
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert health["store"] == {"status": "ok", "queued": 0}

    unknown = served.http.post("/v1/feedback", json={"completion_id": "chatcmpl-nope", "rating": 1})
    assert unknown.status_code == 404 and error_of(unknown)["param"] == "completion_id"
    bad = served.http.post("/v1/feedback", json={"completion_id": cid, "rating": 5})
    assert bad.status_code == 400 and error_of(bad)["param"] == "rating"


# ---------------------------------------------------------------- auth


def test_api_keys(served):
    import ray

    anonymous = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": HELLO}, timeout=30)
    assert anonymous.status_code == 401 and error_of(anonymous)["type"] == "authentication_error"
    for header in ("Bearer sk-wrong", "Basic " + FILE_KEY, FILE_KEY):
        wrong = httpx.get(f"{served.url}/v1/models", headers={"Authorization": header}, timeout=30)
        assert wrong.status_code == 401, header
    assert httpx.post(f"{served.url}/v1/feedback", json={"completion_id": "x", "rating": 1}).status_code == 401
    # the env key is only in this process's environment, not in the replicas': its digest travelled with the app
    replica_env = ray.remote(num_cpus=0)(lambda: os.environ.get("CHATFORGE_TEST_KEYS"))
    assert ray.get(replica_env.remote(), timeout=60) is None
    from_env = httpx.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"}, timeout=30)
    assert from_env.status_code == 200


def test_health_says_only_ok_without_a_key(served):
    assert httpx.get(f"{served.url}/healthz", timeout=30).json() == {"status": "ok"}
    wrong = httpx.get(f"{served.url}/healthz", headers={"Authorization": "Bearer sk-wrong"}, timeout=30)
    assert wrong.json() == {"status": "ok"}
    health = served.http.get("/healthz").json()
    assert health["status"] == "ok" and health["variants"] == ["alpha", "beta", "long"]
    assert health["store"]["status"] == "ok"  # the feedback store's state, for callers with a key only


def test_api_docs_need_a_key(served):
    for path in ("/docs", "/redoc", "/openapi.json"):
        anonymous = httpx.get(f"{served.url}{path}", timeout=30)
        assert anonymous.status_code == 401 and error_of(anonymous)["type"] == "authentication_error", path
        assert served.http.get(path).status_code == 200, path
    schema = served.http.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/docs" not in schema["paths"]
    assert "/openapi.json" in served.http.get("/docs").text


def test_human_eval_page_in_a_browser_signs_in_compares_and_shows_the_result(served, tmp_path):
    """Headless Chromium, keyboard only: sign in with a key, flag answer A, choose B, see the saved notice and the
    vote in the results table and in the store, with the variants the page never showed."""
    from helpers.browser import playwright_page

    with playwright_page() as page:
        response = page.goto(f"{served.url}/ui/compare")
        assert response.status == 401 and page.get_by_role("heading", name="Sign in").is_visible()
        page.get_by_label("API key").fill("sk-wrong")
        page.keyboard.press("Enter")
        assert page.get_by_role("alert").inner_text().startswith("That key is not")
        page.get_by_label("API key").fill(FILE_KEY)
        page.keyboard.press("Enter")
        page.get_by_role("heading", name="Which answer is better?").wait_for()
        prompt = page.locator("#prompt").inner_text()
        answers = [page.locator("#answer-a").inner_text(), page.locator("#answer-b").inner_text()]
        first, second = (page.locator(f"input[name={name}]").get_attribute("value") for name in ("first", "second"))
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        assert prompt and all(answer.strip() for answer in answers)
        assert not any(name in page.content() for name in ('"alpha"', '"beta"', '"long"'))  # anonymised

        page.get_by_label("Flag answer A as harmful").focus()
        page.keyboard.press("Space")  # ticks the box
        page.get_by_role("button", name="B is better").focus()
        page.keyboard.press("Enter")
        page.get_by_role("status").wait_for()
        assert "saved" in page.get_by_role("status").inner_text()
        assert page.locator("#prompt").inner_text()  # the next pair is there

        page.get_by_role("link", name="Results").click()
        page.get_by_role("table").wait_for()
        assert "1 votes" in page.get_by_role("table").locator("caption").inner_text()

    (variant_a, answer_a), (variant_b, answer_b) = (
        stored(served.db, "SELECT variant, answer FROM completions WHERE id = ?", cid)[0] for cid in (first, second)
    )
    words = [" ".join(answer.split()) for answer in (answer_a, answer_b)]  # the browser's text normalises line ends
    assert words == [" ".join(answer.split()) for answer in answers]
    vote = stored(served.db, "SELECT choice, harmful_first, harmful_second FROM comparisons")
    assert vote == [("second", 1, 0)]
    results = served.http.get("/ui/results.json").json()
    assert results["votes"] == 1
    (pair,) = results["pairs"]
    winner = variant_b
    assert {pair["a"], pair["b"]} == {variant_a, variant_b} and variant_a != variant_b
    assert pair["a_wins" if pair["a"] == winner else "b_wins"] == 1 and pair["harmful"][variant_a] == 1


def test_human_eval_pages_are_protected_like_the_api(served):
    anonymous = httpx.get(f"{served.url}/ui/results", timeout=30)
    assert anonymous.status_code == 401 and "Sign in" in anonymous.text
    csp = anonymous.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
    forged = httpx.get(f"{served.url}/ui/compare", cookies={"chatforge_ui_key": "sk-wrong"}, timeout=30)
    assert forged.status_code == 401
    signed_in = httpx.post(f"{served.url}/ui/login", data={"key": ENV_KEY}, timeout=30)
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui/" in cookie
    # a vote on completions another key asked for is refused and stores nothing
    mine = [served.http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()["id"]]
    mine.append(served.http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()["id"])
    other = httpx.post(
        f"{served.url}/ui/compare",
        data={"first": mine[0], "second": mine[1], "choice": "first"},
        headers={"Authorization": f"Bearer {ENV_KEY}"},
        timeout=30,
    )
    assert other.status_code == 404 and "not yours" in other.text
    bad = served.http.post("/ui/compare", data={"first": mine[0], "second": mine[1], "choice": "both"})
    assert bad.status_code == 400 and "choice must be one of" in bad.text
    own = served.http.post("/ui/compare", data={"first": mine[0], "second": mine[1], "choice": "tie"})
    assert own.status_code == 303
    again = served.http.post("/ui/compare", data={"first": mine[0], "second": mine[1], "choice": "first"})
    assert again.status_code == 409
    too_long = served.http.get("/ui/compare", params={"prompt": "x" * 2001})
    assert too_long.status_code == 400 and "2001 characters" in too_long.text


def test_serve_bind_host_is_read_from_serve(served):
    """Canary of compat.serve_http_host: it reads Ray internals; if an upgrade changes them, this fails (and
    anonymous serving is refused) rather than anything guessing loopback."""
    from chatforge.compat import serve_http_host

    assert serve_http_host() == "127.0.0.1"


def test_an_ingress_without_keys_refuses_to_start(served):
    """The serving process itself refuses, whatever built it: here the ingress is bound without build_app's check."""
    from ray import serve

    from chatforge.config import ServeSpec
    from chatforge.serve.app import ChatIngress

    spec = ServeSpec.model_validate({**served.args, "auth": {"api_keys_env": "CHATFORGE_TEST_NO_SUCH_KEYS"}})
    unguarded = ChatIngress.options(name="no-keys", ray_actor_options={"num_cpus": 0.1}).bind(spec, {}, [])
    try:
        with pytest.raises(Exception, match="no-keys failed"):
            serve.run(unguarded, name="no-keys", route_prefix="/no-keys")
        why = serve.status().applications["no-keys"].deployments["no-keys"].message
        assert "no API key is configured" in why, why
    finally:
        serve.delete("no-keys")
    assert httpx.get(f"{served.url}/no-keys/healthz", timeout=30).status_code == 404


def test_openai_client_with_a_wrong_key(served):
    from openai import AuthenticationError, OpenAI

    bad = OpenAI(base_url=f"{served.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.chat.completions.create(model="alpha", messages=HELLO)


# ---------------------------------------------------------------- bad input


def post_raw(served, content: bytes | str) -> httpx.Response:
    return served.http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages": [', None),
        ("[1, 2]", None),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "temperature": 2.5}, "temperature"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 100_000}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": "ten"}, "max_tokens"),
        ({"messages": HELLO, "max_completion_tokens": 65}, "max_completion_tokens"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": HELLO, "stop": "x" * 129}, "stop"),
        ({"messages": HELLO, "stop": ["ok", "y" * 250_000]}, "stop"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": HELLO, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": HELLO, "stream": "yes"}, "stream"),
        ({"messages": HELLO, "seed": -1}, "seed"),
        ({"messages": [{"role": "user", "content": "nul\u0000byte"}]}, "messages.0.content"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(served, body, param):
    response = post_raw(served, body if isinstance(body, str) else json.dumps(body))
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param:
        assert param in error["message"]


def test_unknown_model_is_404(served):
    response = served.http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": HELLO})
    assert response.status_code == 404
    error = error_of(response)
    assert error["param"] == "model" and "alpha" in error["message"]


def test_prompt_over_the_context_window(served):
    long = " ".join(f"garden{i} river{i}" for i in range(300))
    response = served.http.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": long}]}
    )
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    assert "128 tokens" in error["message"]
    streamed = served.http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": long}], "stream": True}
    )
    assert streamed.status_code == 400 and error_of(streamed)["param"] == "messages"


def test_body_over_the_limit_is_413(served):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    response = post_raw(served, huge)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


def test_unknown_route_and_method(served):
    assert error_of(served.http.get("/v1/nothing"))["type"] == "not_found_error"
    assert served.http.get("/v1/chat/completions").status_code == 405


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
text_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)}), max_size=2
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "Robot"]) | json_values,
            "content": st.text(max_size=60) | text_parts | json_values,
        }
    ),
    max_size=3,
)
tiny_temperatures = st.floats(0, 1e-20) | st.sampled_from([5e-324, 1e-300, 1e-45, 1e-38, 1e-30, 1e-6])
long_stops = st.text(min_size=100, max_size=400) | st.lists(  # about the 128-character limit, and well past it
    st.text(min_size=120, max_size=140), min_size=1, max_size=5
)
request_bodies = st.fixed_dictionaries(
    {"messages": messages | json_values},
    optional={
        "model": st.sampled_from(["alpha", "beta", "auto", "nope"]) | json_values,
        "max_tokens": st.integers(-3, 80) | json_values,
        "temperature": st.floats(-1, 3) | tiny_temperatures | json_values,
        "top_p": st.floats(-0.5, 1.5) | json_values,
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | long_stops | json_values,
        "seed": st.integers(-5, 2**64) | json_values,
        "logprobs": st.booleans() | json_values,
        "top_logprobs": st.integers(-1, 22) | json_values,
        "stream": st.booleans(),
        "n": st.integers(0, 2),
        "user": st.text(max_size=10) | json_values,
        "frequency_penalty": json_values,
    },
)
# Bodies valid but for the fields under test, so those reach the model rather than stopping at another field.
plausible_bodies = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(min_size=1, max_size=40)}
            ),
            min_size=1,
            max_size=3,
        ),
        "max_tokens": st.integers(1, 8),
    },
    optional={
        "model": st.sampled_from(["alpha", "beta"]),
        "temperature": tiny_temperatures | st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "stop": long_stops | st.text(min_size=1, max_size=3),
        "seed": st.integers(0, 2**32),
        "stream": st.booleans(),
    },
)


def kinds_of(body) -> list[str]:
    """What a fuzzed body tries, for the statistics (``--hypothesis-show-statistics``)."""
    if not isinstance(body, dict):
        return ["not an object"]
    kinds = []
    temperature = body.get("temperature")
    if isinstance(temperature, float) and 0 < temperature < 1e-5:
        kinds.append("tiny temperature")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if any(isinstance(s, str) and len(s) > 100 for s in stops):
        kinds.append("long stop")
    turns = body.get("messages") if isinstance(body.get("messages"), list) else []
    if any(isinstance(m, dict) and m.get("role") in ("system", "assistant") for m in turns):
        kinds.append("system/assistant turn")
    return kinds or ["other"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=request_bodies | plausible_bodies | json_values)
def test_fuzzed_requests_never_get_a_5xx(served, body):
    response = post_raw(served, json.dumps(body))
    event(f"status {response.status_code}")
    for kind in kinds_of(body):
        event(f"{kind}: {response.status_code}")
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert error_of(response)["message"]
    elif body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.json()["object"] == "chat.completion"


# ---------------------------------------------------------------- A/B


def test_ab_split_is_sticky_per_user_and_named(served):
    seen = {}
    for i in range(16):
        user = f"user-{i}"
        variants = set()
        for _ in range(2):
            response = served.http.post("/v1/chat/completions", json={"messages": HELLO, "user": user, "max_tokens": 2})
            assert response.status_code == 200
            assert response.headers["x-chatforge-variant"] == response.json()["model"]
            variants.add(response.json()["model"])
        assert len(variants) == 1, user
        seen[user] = variants.pop()
    assert set(seen.values()) == {"alpha", "beta"}
    # the API key is the sticky key when no user is given
    by_key = {served.http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()["model"]}
    by_key.add(served.http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()["model"])
    assert len(by_key) == 1


# ---------------------------------------------------------------- guard and metrics


def test_toxic_prompt_is_refused_and_counted(served, client):
    messages = [{"role": "user", "content": TOXIC}]
    completion = client.chat.completions.create(model="alpha", messages=messages)
    choice = completion.choices[0]
    assert choice.finish_reason == "content_filter" and "can't help" in choice.message.content
    row = stored(served.db, "SELECT guard, guard_score, answer FROM completions WHERE id = ?", completion.id)
    assert row[0][0] == "blocked" and row[0][1] >= 0.8
    chunks = list(client.chat.completions.create(model="alpha", messages=messages, stream=True))
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_metrics_are_exported(served, client):
    client.chat.completions.create(model="beta", messages=HELLO, max_tokens=4)
    client.chat.completions.create(model="beta", messages=[{"role": "user", "content": TOXIC}])
    served.http.post("/v1/chat/completions", json={"messages": []})
    wanted = [
        "ray_chatforge_requests_total{",
        "ray_chatforge_tokens_total{",
        "ray_chatforge_request_latency_seconds_bucket{",
        "ray_chatforge_batch_size_bucket{",
        "ray_chatforge_guard_blocks_total{",
    ]
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported: {missing}"
    lines = [line for line in text.splitlines() if line.startswith("ray_chatforge_")]
    assert any('status="400"' in line for line in lines if line.startswith("ray_chatforge_requests_total"))
    blocks = [line for line in lines if line.startswith("ray_chatforge_guard_blocks_total")]
    assert any('where="input"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in blocks)


def test_tiny_temperatures_answer_greedily(served):
    base = {"model": "alpha", "messages": HELLO, "max_tokens": 8}
    greedy = served.http.post("/v1/chat/completions", json={**base, "temperature": 0}).json()
    for temperature in (1e-30, 5e-324):
        response = served.http.post("/v1/chat/completions", json={**base, "temperature": temperature})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_system_and_assistant_turns_are_guarded_too(client):
    for role in ("system", "assistant"):
        messages = [{"role": role, "content": TOXIC}, *HELLO]
        choice = client.chat.completions.create(model="alpha", messages=messages).choices[0]
        assert choice.finish_reason == "content_filter", role


# ---------------------------------------------------------------- overload, deadlines and disconnects


def generated(variant: str = "long") -> int:
    """Tokens the variant's replica engine has generated, waiting until it runs nothing."""
    from ray import serve

    handle = serve.get_deployment_handle(variant, app_name="chatforge")
    deadline = time.monotonic() + 60
    while (stats := handle.stats.remote().result())["running"] or stats["waiting"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    return stats["tokens"]


def long_answer(served) -> tuple[int, float]:
    """(tokens, seconds) of the long variant's whole answer to RIVERS."""
    started = time.monotonic()
    body = {"model": "long", "messages": RIVERS, "max_tokens": LONG, "temperature": 0}
    answer = served.http.post("/v1/chat/completions", json=body).json()
    return answer["usage"]["completion_tokens"], time.monotonic() - started


def test_a_client_leaving_a_plain_request_cancels_its_generation(served):
    tokens, seconds = long_answer(served)
    assert tokens == LONG  # the premise: the model would go on to max_tokens
    before = generated()
    body = {"model": "long", "messages": RIVERS, "max_tokens": LONG, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # httpx closes the connection: the client has left
        served.http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=seconds / 5))
    spent = generated() - before
    assert 0 < spent < LONG / 2, f"{spent} of {LONG} tokens generated for a client that left after {seconds / 5:.2f} s"


def test_overload_gets_503s_with_openai_bodies_never_a_hang(served):
    body = {"model": "long", "messages": RIVERS, "max_tokens": 200, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {FILE_KEY}"}
        async with httpx.AsyncClient(base_url=served.url, headers=headers, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(12)))

    started = time.monotonic()
    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses  # 2 running + 2 queued at most
    for response in responses:
        if response.status_code == 503:
            error = error_of(response)
            assert (error["code"], error["type"]) == ("overloaded", "server_error")
            assert response.headers["retry-after"] == "1"
    assert time.monotonic() - started < 60
    assert served.http.post("/v1/chat/completions", json={**body, "max_tokens": 4}).status_code == 200


@pytest.fixture(scope="module")
def hasty(served):
    """A second ingress, on the same variant replicas, whose deadline (0.3 s) the long answer (~1 s) overruns."""
    from ray import serve

    from chatforge.config import ServeSpec
    from chatforge.serve.app import ChatIngress

    spec = ServeSpec.model_validate(
        {**served.args, "request_timeout_s": 0.3, "guard": {"input_policy": "off", "output_policy": "off"}}
    )
    models = {"long": serve.get_deployment_handle("long", app_name="chatforge")}
    ingress = ChatIngress.options(name="hasty-ingress", ray_actor_options={"num_cpus": 0.1})
    serve.run(ingress.bind(spec, models, [key_digest(FILE_KEY)]), name="hasty", route_prefix="/hasty")
    yield f"{served.url}/hasty"
    serve.delete("hasty")


def test_the_deadline_is_a_503_and_stops_the_generation(served, hasty):
    body = {"model": "long", "messages": RIVERS, "max_tokens": LONG, "temperature": 0}
    before = generated()
    started = time.monotonic()
    response = served.http.post(f"{hasty}/v1/chat/completions", json=body)
    assert response.status_code == 503 and error_of(response)["code"] == "timeout"
    assert time.monotonic() - started < 5
    assert 0 < generated() - before < LONG / 2

    before = generated()
    with served.http.stream("POST", f"{hasty}/v1/chat/completions", json={**body, "stream": True}) as stream:
        assert stream.status_code == 200
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "timeout"  # the OpenAI client raises APIError on it
    assert 0 < generated() - before < LONG / 2
