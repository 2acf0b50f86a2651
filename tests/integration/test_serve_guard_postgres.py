"""The Serve application with the output guard blocking and its feedback store on PostgreSQL, over HTTP.

One variant of a tiny random-weights model; the guard's threshold is 0, so every non-empty answer counts as
toxic: a plain answer is replaced by the refusal, and so is a streamed one, whose text is held back until scored.
Completions and ratings go to the session's private PostgreSQL server; no API keys: anonymous access, which the
app allows because Serve binds 127.0.0.1, for clients on this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from types import SimpleNamespace

import httpx
import pytest
import sqlalchemy as sa

from chatforge.serve.feedback import metadata
from helpers.network import free_port
from helpers.tiny_model import save_tiny_model

pytestmark = pytest.mark.integration

REFUSAL = "Sorry, I won't say that."
QUESTION = [{"role": "user", "content": "Mail me at ada@example.org about the gardens."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, postgres_url):
    import ray
    from ray import serve

    from chatforge.serve.app import build_app

    root = tmp_path_factory.mktemp("serve-pg")
    model = save_tiny_model(root / "model", n_positions=128)
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112 (a Ray config name)
    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    engine = {"max_batch_size": 4, "default_max_tokens": 12, "max_tokens_limit": 32}
    args = {
        "variants": [{"name": "main", "model": str(model), "engine": engine, "num_cpus": 0.5}],
        "guard": {
            "toxicity": {"threshold": 0.0},
            "input_policy": "off",
            "output_policy": "block",
            "refusal": REFUSAL,
            "stream_window_chars": 8,  # a stream's text is scored (and held) 8 characters at a time
        },
        "auth": {"api_keys_env": "CHATFORGE_TEST_NO_SUCH_KEYS", "anonymous": True},
        "feedback": {"url": postgres_url, "url_env": None},
        "ingress_num_cpus": 0.25,
    }
    serve.run(build_app(args), name="chatforge-pg", route_prefix="/")
    url = f"http://127.0.0.1:{http_port}"
    database = sa.create_engine(postgres_url)
    with httpx.Client(base_url=url, timeout=120) as http:
        yield SimpleNamespace(url=url, http=http, db=database, db_url=postgres_url, metrics_port=metrics_port)
    serve.shutdown()
    ray.shutdown()
    with database.begin() as connection:
        metadata.drop_all(connection)  # every table of the store, the ones that reference completions first
    database.dispose()


def all_rows(served, sql: str, count: int = 1, **params) -> list[tuple]:
    """The rows of ``sql`` once there are ``count``: the ingress writes in the background."""
    deadline = time.monotonic() + 60
    while True:
        with served.db.connect() as connection:
            rows = [tuple(row) for row in connection.execute(sa.text(sql), params).fetchall()]
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"{len(rows)} of {count} rows stored within 60 s: {sql}"
        time.sleep(0.2)


def one_row(served, sql: str, **params) -> tuple:
    rows = all_rows(served, sql, **params)
    assert len(rows) == 1, rows
    return rows[0]


def chat(served, **fields) -> httpx.Response:
    body = {"model": "main", "messages": QUESTION, "max_tokens": 12, "temperature": 0, **fields}
    return served.http.post("/v1/chat/completions", json=body)


def test_a_toxic_answer_is_replaced_by_the_refusal_and_stored_as_blocked(served):
    response = chat(served)
    assert response.status_code == 200, response.text
    completion = response.json()
    choice = completion["choices"][0]
    assert choice["message"]["content"] == REFUSAL and choice["finish_reason"] == "content_filter"
    assert completion["usage"]["completion_tokens"] > 0  # the model did answer; the guard replaced it

    guard, score, answer, prompt = one_row(
        served, "SELECT guard, guard_score, answer, prompt FROM completions WHERE id = :id", id=completion["id"]
    )
    assert guard == "blocked" and score is not None and answer == REFUSAL
    assert "ada@example.org" not in prompt and "[EMAIL_1]" in prompt  # scrubbed before it reached PostgreSQL


def test_a_streamed_toxic_answer_is_refused_like_the_plain_one(served):
    plain = chat(served, max_tokens=8).json()
    with served.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "main", "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True},
    ) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    finish = [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]][-1]
    assert plain["choices"][0]["message"]["content"] == REFUSAL  # the same answer, not streamed, is refused
    assert text == REFUSAL and finish == "content_filter"  # and no word of the model's answer was streamed

    guard, answer, streamed = one_row(
        served, "SELECT guard, answer, stream FROM completions WHERE id = :id", id=chunks[0]["id"]
    )
    assert guard == "blocked" and answer == REFUSAL and streamed


def test_a_long_streamed_answer_is_cut_at_its_first_toxic_window(served):
    """Past the held-back window, text goes out once scored: with everything toxic, none of it does."""
    body = {"model": "main", "messages": QUESTION, "max_tokens": 32, "temperature": 0, "stream": True}
    with served.http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]]
    assert "".join(deltas) == REFUSAL and chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_anonymous_callers_get_only_ok_and_no_docs_key_is_needed_locally(served):
    assert served.http.get("/healthz").json() == {"status": "ok"}
    assert served.http.get("/v1/models").status_code == 200  # anonymous, from this machine
    assert "/v1/chat/completions" in served.http.get("/openapi.json").json()["paths"]


def test_of_200_concurrent_ratings_each_completion_keeps_exactly_one(served):
    """Anonymous serving: a completion takes one rating. 200 ratings of 50 completions arrive at once: 50 are
    taken (200), 150 are refused (409), and the store holds exactly the 50 taken."""
    ids = [chat(served, max_tokens=2).json()["id"] for _ in range(50)]
    ratings = [(ids[i % len(ids)], (i % 3) - 1) for i in range(200)]

    async def post_all() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as http:
            responses = await asyncio.gather(
                *(
                    http.post("/v1/feedback", json={"completion_id": cid, "rating": rating, "comment": f"#{n}"})
                    for n, (cid, rating) in enumerate(ratings)
                )
            )
        return [response.status_code for response in responses]

    statuses = asyncio.run(post_all())
    assert sorted(set(statuses)) == [200, 409] and statuses.count(200) == 50, statuses
    taken = {ratings[n] for n, status in enumerate(statuses) if status == 200}
    assert {completion_id for completion_id, _ in taken} == set(ids)  # one per completion
    stored = all_rows(
        served, "SELECT completion_id, rating FROM feedback WHERE completion_id = ANY(:ids)", count=50, ids=ids
    )
    assert sorted(stored) == sorted(taken)


def test_ray_data_reads_the_postgres_store_back(served):
    from chatforge.serve.feedback import read_feedback

    completion = chat(served, max_tokens=3).json()
    served.http.post("/v1/feedback", json={"completion_id": completion["id"], "rating": 1, "correction": "Sure."})
    one_row(served, "SELECT id FROM feedback WHERE completion_id = :id", id=completion["id"])  # written by now
    rows = [row for row in read_feedback(served.db_url).take_all() if row["completion_id"] == completion["id"]]
    assert len(rows) == 1
    assert rows[0]["rating"] == 1 and rows[0]["correction"] == "Sure." and rows[0]["guard"] == "blocked"
