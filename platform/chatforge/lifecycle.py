"""`chatforge run`: the whole lifecycle on one spec, each stage the same command a user would type.

curate -> train -> eval -> serve (start; a smoke request; simulated users' ratings, bounded, on loopback) -> one
continual-learning cycle on those ratings, while the server runs -> stop the server. Each stage runs as its own
`chatforge` process: its live progress and tables are the command's own, its Ray is started and stopped by it (a
stage that crashes takes nothing else down), and what a stage writes is exactly what the command writes. The server
is the one long-lived child; the run stops it, whatever happened, before it returns.

OUTPUT/summary.json names each stage (name, status "ok" or the error, output, seconds) and the lineage data -> run
-> model -> deployment; it is rewritten after every stage, so a run that stops says where. A run replaces what an
earlier run wrote into OUTPUT, the feedback store and the loop's cycles included: they rated the earlier model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatforge.files import write_atomic

STAGES = ("curate", "train", "eval", "serve", "loop")
# Each stage's output under the run's: the directories the quickstart's own commands write
STAGE_DIRS = {"curate": "curated", "train": "train", "eval": "eval", "serve": "serve", "loop": "loop"}
SUMMARY_JSON = "summary.json"
SMOKE_QUESTION = "Hi! How are you doing today?"
HEALTH_TIMEOUT_S = 600.0  # a server's start: Ray, the replicas, the model loads
STOP_TIMEOUT_S = 90.0  # a server's orderly stop (Serve drains, the store's queue is written) before it is killed
ANSWER_TOKENS = 48  # what a simulated user asks for per answer
ANSWER_TEMPERATURE = 0.7  # as `chatforge eval` samples: a 135M model rambles at the API's default of 1
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class StageFailed(RuntimeError):
    """A stage ended badly; the message is its own error line. Out of ``run_lifecycle``, ``run`` is the Run as
    summary.json has it."""

    run: Run | None = None


@dataclass
class Stage:
    name: str
    status: str = "not run"  # "ok", "not run", or the stage's error
    output: str | None = None
    seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What summary.json holds; ``write`` puts it there whole."""

    spec: str
    output: str
    stages: list[Stage]
    lineage: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def write(self) -> str:
        path = os.path.join(self.output, SUMMARY_JSON)
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
        return path


def cli(command: str, spec: str, *args: str) -> list[str]:
    """The argv of ``chatforge COMMAND SPEC ARGS`` under this Python."""
    return [sys.executable, "-m", "chatforge.cli", command, spec, *args]


def error_line(tail: str) -> str:
    """A failed command's own error line (`error: ...`), else its last line of output."""
    lines = [_ANSI.sub("", line).strip() for line in tail.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    return lines[-1] if lines else "no output"


def run_child(argv: list[str], env: dict[str, str], tail_bytes: int = 16_384) -> None:
    """Run a command with its stderr passed through as it comes (live progress); StageFailed with its error line
    when it exits non-zero."""
    process = subprocess.Popen(argv, env=env, stdout=sys.stderr.fileno(), stderr=subprocess.PIPE)
    tail = b""
    assert process.stderr is not None
    while chunk := process.stderr.read1(4096):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail = (tail + chunk)[-tail_bytes:]
    if process.wait() != 0:
        raise StageFailed(error_line(tail.decode(errors="replace")))


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}
    if sys.stderr.isatty():  # the children's stderr is a pipe: let rich draw live progress as on a terminal
        env.setdefault("TTY_COMPATIBLE", "1")
        env.setdefault("COLUMNS", str(os.get_terminal_size(sys.stderr.fileno()).columns))
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the server stage


@dataclass
class Server:
    url: str
    key: str
    log: str
    process: subprocess.Popen
    dashboard: str  # its Ray's dashboard, where the loop deploys a canary


@contextmanager
def running_server(
    spec: str, overrides: list[str], model: str, port: int, log_path: str, key_env: str, dashboard_port: int
) -> Iterator[Server]:
    """`chatforge serve --via-dashboard` in the background on 127.0.0.1:``port`` (its Ray's dashboard on
    ``dashboard_port``), with a key of the run's own beside any configured one; stopped (SIGTERM, then killed after
    STOP_TIMEOUT_S) on the way out, whatever happened."""
    import secrets

    key = secrets.token_urlsafe(32)
    keys = ",".join(k for k in (os.environ.get(key_env, ""), key) if k)
    env = child_env({key_env: keys})
    env.pop("TTY_COMPATIBLE", None)  # its output goes to a log file
    argv = cli(
        "serve",
        spec,
        *overrides,
        f"ray.dashboard_port={dashboard_port}",
        "--model",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--via-dashboard",  # deployed from a config, so that the loop can add its candidate as a canary
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", key, log_path, process, f"http://127.0.0.1:{dashboard_port}")
    try:
        wait_healthy(server)
        yield server
    finally:
        stop_server(process)


def wait_healthy(server: Server) -> None:
    import httpx

    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise StageFailed(f"the server exited ({server.process.returncode}): {error_line(log_tail(server.log))}")
        try:
            if httpx.get(f"{server.url}/v1/models", headers=auth(server.key), timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise StageFailed(f"the server did not answer within {HEALTH_TIMEOUT_S:g} s; its log: {server.log}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its session: the Ray it started goes too
        process.wait()


def log_tail(path: str, size: int = 16_384) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode(errors="replace")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(url: str, key: str, messages: list[dict[str, str]], max_tokens: int = ANSWER_TOKENS) -> dict[str, Any]:
    import httpx

    body = {"messages": messages, "max_tokens": max_tokens, "temperature": ANSWER_TEMPERATURE}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(key), timeout=300)
    if response.status_code != 200:
        raise StageFailed(f"POST /v1/chat/completions answered {response.status_code}: {response.text[:300]}")
    return response.json()


def simulated_rating(answer: str, reply: str) -> tuple[int, str | None]:
    """A simulated chitchat user: +1 for an answer that says something (3 words or more) without rambling (at most
    three times the corpus reply's length, and 40 characters more); otherwise -1, correcting it with the corpus
    reply, which the loop then trains on."""
    words = answer.split()
    if len(words) >= 3 and len(answer) <= 3 * len(reply) + 40:
        return 1, None
    return -1, reply


def first_exchange(conversation: list[dict[str, str]]) -> tuple[list[dict[str, str]], str] | None:
    """(the messages up to the first assistant turn, that turn's text), or None without one."""
    for i, message in enumerate(conversation):
        if message["role"] == "assistant":
            return (conversation[:i], message["content"]) if i else None
    return None


def rate_answers(url: str, key: str, conversations: list[list[dict[str, str]]], concurrency: int = 4) -> dict[str, Any]:
    """Ask each conversation's opening (a few at once, so the server batches) and rate each answer like
    ``simulated_rating``; returns the counts."""
    import httpx

    exchanges = [found for found in map(first_exchange, conversations) if found]

    def one(exchange) -> int:
        messages, reply = exchange
        answer = ask(url, key, messages)
        rating, correction = simulated_rating(answer["choices"][0]["message"]["content"], reply)
        body = {"completion_id": answer["id"], "rating": rating, "correction": correction}
        response = httpx.post(f"{url}/v1/feedback", json=body, headers=auth(key), timeout=60)
        if response.status_code != 200:
            raise StageFailed(f"POST /v1/feedback answered {response.status_code}: {response.text[:300]}")
        return rating

    with ThreadPoolExecutor(concurrency) as pool:
        ratings = list(pool.map(one, exchanges))
    return {"asked": len(ratings), "positive": ratings.count(1), "negative_corrected": ratings.count(-1)}


def serve_cpus(spec) -> int:
    """The serving Ray's CPUs: the spec's (or the machine's), and room for a canary replica of the first variant
    beside the others. Logical CPUs: a canary takes a share of the traffic, not a core of its own."""
    own = spec.ray.num_cpus or os.cpu_count() or 1
    return own + math.ceil(spec.serve.variants[0].num_cpus)


# ---------------------------------------------------------------- the run


def run_lifecycle(
    spec: str,
    overrides: list[str],
    output: str,
    ratings: int,
    port: int | None = None,
    say: Callable[[str], None] = print,
) -> Run:
    """Run every stage into ``output``; the Run as summary.json has it. A failed stage ends the run (its status is
    the error; the later ones stay "not run"), and StageFailed is raised after summary.json is written."""
    from chatforge.config import load_spec

    loaded = load_spec(spec, overrides)  # a bad spec or override fails here, before anything runs
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out / STAGE_DIRS[name]) for name in STAGES}
    curated_data, model = f"{paths['curate']}/data", f"{paths['train']}/model"
    store = f"sqlite:///{paths['serve']}/feedback.db"
    at_store = [f"serve.feedback.url={store}", "serve.feedback.url_env=null"]
    run = Run(spec, str(out), [Stage(name) for name in STAGES])
    run.write()

    def stage(name: str, work: Callable[[Stage], None]) -> None:
        current = run.stage(name)
        current.output = paths[name]
        say(f"stage {STAGES.index(name) + 1}/{len(STAGES)}: {name}")
        started = time.monotonic()
        try:
            work(current)
        except Exception as error:
            if current.status == "ok":  # a stage run inside this one failed (the loop, while the server runs)
                raise
            current.status = str(error) if isinstance(error, StageFailed) else f"{type(error).__name__}: {error}"
            run.status = f"failed at {name}"
            if isinstance(error, StageFailed):
                raise
            raise StageFailed(current.status) from error
        finally:
            if current.seconds is None:
                current.seconds = round(time.monotonic() - started, 1)
            run.write()
        current.status = "ok"
        run.write()

    def curate(_: Stage) -> None:
        run_child(cli("curate", spec, *overrides, "--output", paths["curate"]), child_env())

    def train(_: Stage) -> None:
        argv = cli("train", spec, *overrides, "--data", curated_data, "--output", paths["train"], "--overwrite")
        run_child(argv, child_env())  # a run's stages start afresh in their OUTPUT

    def evaluate(current: Stage) -> None:
        argv = cli("eval", spec, *overrides, "--model", model, "--data", paths["curate"], "--output", paths["eval"])
        run_child(argv, child_env())
        result = json.loads(Path(paths["eval"], "eval.json").read_text())
        current.details = {key: result.get(key) for key in ("perplexity", "toxicity_rate", "refusal_rate")}
        current.details["report"] = str(Path(paths["eval"], "report.html"))

    def serve_and_loop(current: Stage) -> None:
        from chatforge.eval.perplexity import read_conversations

        started = time.monotonic()
        for stale in (paths["serve"], paths["loop"]):  # an earlier run's store and cycles rated its own model
            shutil.rmtree(stale, ignore_errors=True)
        Path(paths["serve"]).mkdir(parents=True, exist_ok=True)
        key_env = loaded.serve.auth.api_keys_env or "CHATFORGE_API_KEYS"
        log = f"{paths['serve']}/serve.log"
        say(f"serve: starting the server (log: {log})")
        serve_overrides = [*overrides, *at_store, f"ray.num_cpus={serve_cpus(loaded)}"]
        with running_server(spec, serve_overrides, model, port or free_port(), log, key_env, free_port()) as server:
            smoke = ask(server.url, server.key, [{"role": "user", "content": SMOKE_QUESTION}])
            answer = smoke["choices"][0]["message"]["content"]
            say(f"serve: {SMOKE_QUESTION!r} -> {answer!r}")
            conversations = read_conversations(curated_data, "test", limit=ratings)
            say(f"serve: {len(conversations)} simulated users ask and rate the answers")
            counts = rate_answers(server.url, server.key, conversations)
            variant = loaded.serve.variants[0].name
            current.details = {"url": server.url, "variant": variant, "smoke": {"question": SMOKE_QUESTION,
                               "answer": answer}, "ratings": counts, "store": store}  # fmt: skip
            current.status, current.seconds = "ok", round(time.monotonic() - started, 1)
            run.write()
            stage("loop", lambda loop_stage: cycle(loop_stage, server))

    def cycle(current: Stage, server: Server) -> None:
        settle = loaded.loop.settle_s
        if settle:
            time.sleep(settle)  # the cycle takes only ratings older than loop.settle_s
        argv = cli(
            "loop",
            spec,
            *overrides,
            *at_store,
            "--output",
            paths["loop"],
            f"loop.deployed_model={model}",
            f"loop.replay_data=[{curated_data}]",
            f"loop.deployed_eval={paths['eval']}",  # the eval stage measured the deployed model: the gate reuses it
            f"loop.canary.dashboard={server.dashboard}",  # a candidate that passes the gate joins the app as a canary
        )
        run_child(argv, child_env())
        cycles = sorted(Path(paths["loop"]).glob("cycle-*/cycle.json"))
        if cycles:
            record = json.loads(cycles[-1].read_text())
            current.details = {
                "cycle_json": str(cycles[-1]),
                "status": record.get("status"),
                "gate": (record.get("eval") or {}).get("gate"),
                "candidate_model": record.get("candidate_model"),
                "deployment": record.get("deployment"),
            }

    try:
        stage("curate", curate)
        stage("train", train)
        stage("eval", evaluate)
        stage("serve", serve_and_loop)
    except StageFailed as error:
        error.run = run
        raise
    finally:
        run.lineage = lineage(run, model, paths["eval"])
        if run.status == "running":
            run.status = "ok"
        run.write()
    return run


def lineage(run: Run, model: str, eval_dir: str) -> list[dict[str, Any]]:
    """data -> curation -> training -> model -> eval from the files (`chatforge lineage`), then the deployment;
    as far as the run got."""
    from chatforge.lineage import LineageError, lineage_of

    if run.stage("train").status != "ok":
        return []
    evals = [eval_dir] if run.stage("eval").status == "ok" else []
    try:
        links = [asdict(link) for link in lineage_of(model, evals).links]
    except LineageError as error:
        return [{"kind": "error", "label": str(error)}]
    serve = run.stage("serve")
    if serve.status == "ok":
        links.append(
            {
                "kind": "deployment",
                "label": f"{serve.details['variant']} at {serve.details['url']} (stopped at the end of the run)",
                "run_id": None,
                "path": str(Path(model).resolve()),
                "details": {"store": serve.details["store"], "ratings": serve.details["ratings"]},
            }
        )
    canary = run.stage("loop").details.get("deployment") or {}
    if canary.get("action") == "deploy":  # the cycle's candidate, deployed beside the model as a canary
        share = canary["weights"][canary["canary"]]
        links.append(
            {
                "kind": "deployment",
                "label": f"canary {canary['canary']} ({share:.0%} of the traffic) beside {canary['production']} at "
                f"{serve.details['url']} (stopped at the end of the run)",
                "run_id": None,
                "path": canary["model"],
                "details": {"weights": canary["weights"]},
            }
        )
    return links
