"""`chatforge curate` with the condition step asking a model served elsewhere: a real `chatforge serve` process (its
own Ray, an API key) answers the curation's requests over HTTP."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys

import pytest
import yaml

from helpers.corpus import conversation, sharegpt_record
from helpers.network import free_port, wait_healthy
from helpers.tiny_model import save_tiny_model

pytestmark = pytest.mark.integration

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
KEY = "condition-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model behind `chatforge serve` on 127.0.0.1, with one API key; its store is a SQLite file."""
    tmp = tmp_path_factory.mktemp("endpoint")
    model = save_tiny_model(tmp / "model")
    spec = {
        "ray": {"num_cpus": 1},
        "serve": {
            "variants": [
                {
                    "name": "tiny",
                    "model": str(model),
                    "num_cpus": 0.5,
                    "engine": {"default_max_tokens": 8, "max_tokens_limit": 16},
                }
            ],
            "feedback": {"url": f"sqlite:///{tmp / 'feedback.db'}", "url_env": None},
            "guard": {"input_policy": "off", "output_policy": "off"},
            "ingress_num_cpus": 0.25,
        },
    }
    (tmp / "serve.yaml").write_text(yaml.safe_dump(spec))
    port = free_port()
    with open(tmp / "serve.log", "wb") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [sys.executable, "-m", "chatforge.cli", "serve", str(tmp / "serve.yaml"), "--port", str(port)],
            env={**ENV, "CHATFORGE_API_KEYS": KEY},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, tmp / "serve.log")
    yield {"url": url, "process": process, "store": tmp / "feedback.db", "log": tmp / "serve.log"}
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def curate(tmp_path, server, key: str | None, *overrides: str):
    rng = random.Random(11)
    conversations = [conversation(rng, turns=turns, words=(3, 6)) for turns in [2, 4, 6] * 2]
    # an earlier turn whose context is over the tiny model's 128 positions: the server refuses it (400), the turn stays
    conversations.append([
        {"role": "user", "content": " ".join(["garden"] * 200)},
        {"role": "assistant", "content": "that is a lot of gardens"},
        {"role": "user", "content": "sorry"},
        {"role": "assistant", "content": "no problem"},
    ])  # fmt: skip
    source = tmp_path / "dump.jsonl"
    source.write_text("".join(json.dumps(sharegpt_record(f"r{i}", c)) + "\n" for i, c in enumerate(conversations)))
    env = {**ENV, "CHATFORGE_CONDITION_API_KEY": key} if key else ENV
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatforge.cli",
            "curate",
            "pipelines/curate.yaml",
            "--input",
            str(source),
            "--format",
            "sharegpt",
            "--output",
            str(tmp_path / "out"),
            "--json",
            "ray.num_cpus=1",
            "curate.steps=[normalize, filters, condition, split]",
            f"curate.condition.endpoint.url={server['url']}/v1",
            "curate.condition.temperature=0",
            "curate.condition.max_new_tokens=5",
            "curate.condition.batch_size=4",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return result, conversations


def stored_completions(store) -> dict[str, str]:
    with sqlite3.connect(store) as db:
        return {prompt: answer for prompt, answer in db.execute("SELECT prompt, answer FROM completions")}


def test_a_refused_key_stops_curation_naming_the_env_var(tmp_path, server):
    result, _ = curate(tmp_path, server, "not-the-key", "curate.condition.endpoint.retries=0")
    assert result.returncode != 0
    assert "answered 401" in result.stderr and "set CHATFORGE_CONDITION_API_KEY" in result.stderr
    assert not (tmp_path / "out" / "data").exists()  # nothing half-written


def test_curation_regenerates_turns_with_the_served_model(tmp_path, server):
    result, conversations = curate(tmp_path, server, KEY)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(result.stdout.strip().splitlines()[-1])
    earlier = sum(len(c) // 2 - 1 for c in conversations)  # each assistant turn but the last
    assert manifest["kept"] == len(conversations)
    assert manifest["conditioning"] == {"conversations": 4, "regenerated_turns": earlier - 1, "kept_turns": 1}

    import pyarrow.parquet as pq

    rows = {row["id"]: row for row in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    long_one = rows[f"dump:r{len(conversations) - 1}"]
    assert long_one["messages"][1]["content"] == "that is a lot of gardens" and long_one["conditioned"] == {
        "regenerated": 0,
        "kept": 1,
    }
    # every regenerated turn is an answer the server gave (and stored) to exactly the turns before it; the module's
    # last test stops the server (its store writer flushes on the way out)
    server["process"].send_signal(signal.SIGTERM)
    server["process"].wait(60)
    answered = stored_completions(server["store"])
    regenerated = 0
    for i, original in enumerate(conversations[:-1]):
        row = rows[f"dump:r{i}"]
        for index in json.loads(row["meta"] or "{}").get("conditioned_from", {}):
            messages = row["messages"]
            prompt = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages[: int(index)]])
            assert json.loads(prompt) in [json.loads(p) for p in answered], f"turn {index} of r{i} was not asked"
            assert (
                answered[next(p for p in answered if json.loads(p) == json.loads(prompt))]
                == messages[int(index)]["content"]
            )
            regenerated += 1
        assert row["messages"][-1] == original[-1]
    assert regenerated == earlier - 1
