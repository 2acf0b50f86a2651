"""Serving throughput, latency and CPU: chatforge's Ray Serve app over HTTP at concurrency 1, 8 and 32, optionally
beside `transformers serve --continuous-batching` on the same model and load.

    .venv/bin/python benchmarks/serve.py --json                 # the default model; expect ~10 minutes on 2 cores
    .venv/bin/python benchmarks/serve.py --requests 4 --max-tokens 8 --concurrency 1,2   # a smoke run
    .venv/bin/python benchmarks/serve.py --model smollm2 --stream --json   # the embedded SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/serve.py --peer transformers --json        # the same levels on transformers serve too
    .venv/bin/python benchmarks/serve.py --config quickstart --json        # with the quickstart's guard on

Serves ``--model`` (default: a freshly built scratch GPT-2 of chatforge's default config, 4 layers x 256, random
weights, saved to a temp dir: throughput does not depend on what the weights say; its BPE, trained on the 30 words
the prompts use, stops at ~400 of the config's 8000 tokens; ``smollm2``: the embedded SmolLM2-135M-Instruct,
materialized once from its GGUF file as a safetensors dir; or any ``model.name_or_path`` form: a dir, a .gguf file)
on 127.0.0.1 only, and measures, per concurrency level, ``--requests`` chat completions of exactly ``--max-tokens``
tokens (random weights at temperature 1 almost never sample the end token, and each request has its own seed;
requests that end early are counted and their tokens are what is counted): completion tokens/s, requests/s,
p50/p99 latency, with ``--stream`` (requests sent with ``stream: true``) p50/p99 time to the first content chunk
(``ttft_*_ms``), and ``cpu_ms_per_token``: the server's CPU time (user + system) over the level's measured
requests divided by their completion tokens. The server is every process descended from this one for chatforge
(the Ray cluster ``ray.init`` starts: GCS, raylet, its agents, the Serve controller, proxy and replicas; this
process, which sends the requests, is left out) and the ``transformers serve`` process with its children for the
peer; a process that exits within a level loses its CPU time.

``--config`` chooses chatforge's serving settings: ``bare`` (default) serves with the guard off; ``quickstart``
with the guard of serve/quickstart.yaml (input ``flag``, output ``block``: the offline toxicity scorer on every
prompt and answer). Both write every completion to a SQLite feedback store in the temp dir, in the background: the
app has no switch to turn the store off. The engine's settings are this script's flags either way.

Then
  - ``batching_gain``: tokens/s at the highest concurrency with the app's batching (``--max-batch-size``) divided
    by the same with ``max_batch_size=1`` (one sequence decoded at a time per replica);
  - ``overhead_ms``: median latency at concurrency 1 through HTTP + Serve minus the median of calling
    ``Engine.complete`` directly in this process, same model, prompts, seeds and torch threads;
  - ``failed_requests``: non-200 answers or transport errors over chatforge's runs (must be 0).
With ``--peer transformers``, after chatforge's runs and with Ray shut down, ``transformers serve <model dir>
--continuous-batching --device cpu`` starts on a free 127.0.0.1 port (``OMP_NUM_THREADS`` = ``--torch-threads``)
and the same levels run against it, with the same prompts, seeds, ``max_tokens`` and streaming: ``peer.levels``,
``peer.failed_requests``, and per level ``ratio``: chatforge's figure over the peer's for tokens/s (> 1: chatforge
is faster), p50/p99 latency, TTFT and CPU per token (< 1: chatforge's is lower). Both sides serve one dir: the
model's files linked into the temp dir with a generation config that samples (``do_sample``, temperature 1, no
top-k or top-p), since transformers' continuous batching takes ``do_sample`` from the model's generation config,
not from requests; chatforge's engine reads only the end tokens there.
Each level stops issuing requests after ``--level-seconds``. Progress goes to stderr; the result is printed as
JSON on stdout (with ``--json`` as one last line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers.network import free_port  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEER_START_TIMEOUT_S = 300  # transformers serve loads the model and warms its batching up before /health answers
WORDS = (
    "river garden morning coffee train window music letter mountain bread winter city friend story paper light "
    "quiet market bridge question answer evening rain forest kitchen school road summer island book color"
).split()


def say(message: str) -> None:
    print(f"[serve-bench] {message}", file=sys.stderr, flush=True)


def build_default_model(directory: Path) -> Path:
    """chatforge's scratch GPT-2 at its default config (`model.name_or_path: scratch`), random weights."""
    import torch

    from chatforge.config import ModelSpec
    from chatforge.train.model import build_model, train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(5, 30))) for _ in range(4000)]
    spec = ModelSpec(name_or_path="scratch")
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    torch.manual_seed(0)
    model = build_model(spec, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def resolve_model(reference: str) -> str:
    """A servable model dir for ``--model``: ``smollm2`` is the embedded default, anything else a name_or_path."""
    from chatforge.config import DEFAULT_MODEL
    from chatforge.train.pretrained import model_path

    return model_path(DEFAULT_MODEL if reference == "smollm2" else reference)


def sampling_view(model: str, directory: Path) -> str:
    """``model``'s files linked into ``directory``, with a generation config that samples at temperature 1 (no
    top-k, no top-p): what both sides serve with ``--peer``. transformers serve's continuous batching takes
    ``do_sample`` from the model's generation config, not from requests, so with the config most models ship it
    would decode greedily while chatforge samples; chatforge's engine reads only the end tokens from that file."""
    from transformers import AutoConfig, GenerationConfig

    source = Path(model)
    if not source.is_dir():
        raise SystemExit(f"--peer needs a local model dir; {model} is not one")
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: the model config's end tokens
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))
    generation.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    directory.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "generation_config.json":
            (directory / entry.name).symlink_to(entry.resolve())
    generation.save_pretrained(directory)
    return str(directory)


class ServerCpu:
    """CPU seconds (user + system) a server's processes spend between ``start`` and ``seconds``: ``root`` and its
    descendants, or its descendants alone with ``include_root=False``."""

    def __init__(self, root: int, include_root: bool = True) -> None:
        self.root = psutil.Process(root)
        self.include_root = include_root
        self.before: dict[int, float] = {}

    def _now(self) -> dict[int, float]:
        processes = [self.root] if self.include_root else []
        with contextlib.suppress(psutil.Error):
            processes += self.root.children(recursive=True)
        seconds = {}
        for process in processes:
            with contextlib.suppress(psutil.Error):  # a process may exit between listing and reading
                times = process.cpu_times()
                seconds[process.pid] = times.user + times.system
        return seconds

    def start(self) -> None:
        self.before = self._now()

    def seconds(self) -> float:
        """Since ``start``: a process that started since counts whole, one that exited since is lost."""
        return sum(max(0.0, spent - self.before.get(pid, 0.0)) for pid, spent in self._now().items())


def log_tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def wait_for_peer(process: subprocess.Popen, url: str, log: Path) -> str:
    """The model id transformers serve lists at /v1/models, once /health answers ok; errors carry its log's tail."""
    import httpx

    deadline = time.monotonic() + PEER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"transformers serve exited with code {process.returncode} before it answered; its log ends:\n"
                + log_tail(log)
            )
        with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
        time.sleep(1)
    raise RuntimeError(
        f"transformers serve did not answer {url}/health within {PEER_START_TIMEOUT_S} s; its log ends:\n"
        + log_tail(log)
    )


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group ``process`` leads, SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def transformers_serve(model: str, threads: int, log: Path) -> Iterator[tuple[str, str, int, list[str]]]:
    """``transformers serve <model> --continuous-batching`` on a free 127.0.0.1 port, in a process group of its own,
    logging to ``log``: yields its base URL, its model id, its pid and the command, once it answers; stopped on exit."""
    cli = shutil.which("transformers", path=os.path.dirname(sys.executable)) or shutil.which("transformers")
    if cli is None:
        raise SystemExit("--peer transformers: no `transformers` command next to this Python or on PATH")
    port = free_port()
    command = [cli, "serve", model, "--continuous-batching", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--device", "cpu"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        yield url, wait_for_peer(process, url, log), process.pid, command
    finally:
        stop_process_group(process)


def prompts(count: int, seed: int = 1) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": " ".join(rng.choices(WORDS, k=24))}] for _ in range(count)]


def percentile_ms(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) if ordered else None


def summarize(
    latencies: list[float], tokens: int, wall: float, short: int, ttfts: list[float] = (), cpu_s: float | None = None
) -> dict:
    result = {
        "requests": len(latencies),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        "requests_per_s": round(len(latencies) / wall, 2) if wall else 0.0,
        "p50_ms": percentile_ms(latencies, 0.5),
        "p99_ms": percentile_ms(latencies, 0.99),
        "ended_early": short,
    }
    if ttfts:
        result.update(ttft_p50_ms=percentile_ms(ttfts, 0.5), ttft_p99_ms=percentile_ms(ttfts, 0.99))
    if cpu_s is not None:
        result.update(
            server_cpu_s=round(cpu_s, 3), cpu_ms_per_token=round(1000 * cpu_s / tokens, 3) if tokens else None
        )
    return result


def ratios(ours: dict, theirs: dict) -> dict:
    """chatforge's figure over the peer's, one level: tokens/s > 1, or latency and CPU per token < 1, favour chatforge."""
    names = ["tokens_per_s", "p50_ms", "p99_ms", "cpu_ms_per_token"]
    names += [name for name in ("ttft_p50_ms", "ttft_p99_ms") if name in ours]
    return {
        name: round(ours[name] / theirs[name], 3) if ours.get(name) and theirs.get(name) else None for name in names
    }


async def http_level(
    url: str, concurrency: int, count: int, args, failures: list, model: str | None = None, cpu: ServerCpu | None = None
) -> dict:
    """``count`` chat completions at ``concurrency``, after two warm-up ones; ``model`` goes in each request when
    given, and ``cpu`` measures the server's CPU time over the measured requests."""
    import httpx

    todo = list(enumerate(prompts(count)))
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = short = 0
    deadline = time.monotonic() + args.level_seconds

    async def streamed(client: httpx.AsyncClient, body: dict, started: float) -> tuple[float | None, int]:
        """Time to the first content chunk and the completion tokens of a streamed request (SSE)."""
        first, used = None, 0
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise httpx.HTTPStatusError(f"{response.status_code}", request=response.request, response=response)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
        return first, used

    async def one(client: httpx.AsyncClient, index: int, messages: list[dict[str, str]], measured: bool) -> None:
        nonlocal tokens, short
        body = {"messages": messages, "max_tokens": args.max_tokens, "temperature": 1.0, "seed": index}
        if model is not None:
            body["model"] = model
        started = time.perf_counter()
        first = None
        try:
            if args.stream:
                first, used = await streamed(client, body, started)
            else:
                response = await client.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    return
                used = response.json()["usage"]["completion_tokens"]
        except httpx.HTTPError as error:
            failures.append(repr(error))
            return
        if measured:
            latencies.append(time.perf_counter() - started)
            if first is not None:
                ttfts.append(first)
            tokens += used
            short += used < args.max_tokens

    async def worker(client: httpx.AsyncClient) -> None:
        while todo and time.monotonic() < deadline:
            index, messages = todo.pop()
            await one(client, index, messages, measured=True)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        warm = prompts(2, seed=99)
        await asyncio.gather(*(one(client, 10_000 + i, m, measured=False) for i, m in enumerate(warm)))
        if cpu is not None:
            cpu.start()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu_s = cpu.seconds() if cpu is not None else None
    return summarize(latencies, tokens, wall, short, ttfts, cpu_s)


def direct_latency(model: str, engine_spec, count: int, args) -> dict:
    """Engine.complete called in this process, one request at a time: the baseline of ``overhead_ms``."""
    from chatforge.serve.engine import Engine, SamplingParams

    engine = Engine(model, engine_spec)

    async def run() -> dict:
        items = list(enumerate(prompts(count)))
        for index, messages in items[:2]:  # warm-up, not measured
            await engine.complete(engine.encode_chat(messages), SamplingParams(max_tokens=args.max_tokens, seed=index))
        latencies, tokens, short = [], 0, 0
        for index, messages in items:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=index)
            started = time.perf_counter()
            completion = await engine.complete(engine.encode_chat(messages), params)
            latencies.append(time.perf_counter() - started)
            tokens += completion.completion_tokens
            short += completion.completion_tokens < args.max_tokens
        return summarize(latencies, tokens, sum(latencies), short)

    return asyncio.run(run())


def quickstart_guard() -> dict:
    """The guard of serve/quickstart.yaml: that of `chatforge serve pipelines/quickstart.yaml` too (GuardSpec's
    defaults)."""
    import yaml

    with open(os.path.join(ROOT, "serve", "quickstart.yaml")) as file:
        return yaml.safe_load(file)["applications"][0]["args"]["guard"]


def guard_of(config: str) -> dict:
    return quickstart_guard() if config == "quickstart" else {"input_policy": "off", "output_policy": "off"}


def serve_args(model: str, max_batch_size: int, args, db: str) -> dict:
    return {
        "variants": [
            {
                "name": "bench",
                "model": model,
                "num_cpus": args.replica_cpus,
                "max_ongoing_requests": max(64, 2 * max(args.levels)),
                "engine": {
                    "max_batch_size": max_batch_size,
                    "default_max_tokens": max(args.max_tokens, 16),
                    "max_tokens_limit": max(args.max_tokens, 16),
                    "torch_threads": args.torch_threads,
                },
            }
        ],
        "guard": guard_of(args.config),
        "auth": {"anonymous": True},
        "feedback": {"url": f"sqlite:///{db}", "url_env": None},
        "ingress_num_cpus": 0.25,
    }


def run_peer(model: str, args, tmp: Path) -> dict:
    """The same levels against ``transformers serve --continuous-batching`` serving ``model``."""
    import transformers

    failures: list[str] = []
    peer: dict = {"name": "transformers serve --continuous-batching", "version": transformers.__version__}
    say("starting transformers serve")
    with transformers_serve(model, args.torch_threads, tmp / "transformers-serve.log") as (url, model_id, pid, command):
        peer.update(command=" ".join(command[1:]), model=model_id, levels={})
        cpu = ServerCpu(pid)
        for level in args.levels:
            count = max(args.requests, 2 * level)
            say(f"peer, concurrency {level}: {count} requests")
            figures = asyncio.run(http_level(url, level, count, args, failures, model=model_id, cpu=cpu))
            peer["levels"][str(level)] = figures
            say(json.dumps(figures))
    peer["failed_requests"] = len(failures)
    peer["failures_sample"] = failures[:5]
    return peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        help="exported model dir, any model.name_or_path form, or smollm2 (default: a scratch GPT-2, random weights)",
    )
    parser.add_argument("--stream", action="store_true", help="stream every request (SSE); adds time to first token")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least 2x it)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--level-seconds", type=float, default=180, help="stop issuing requests of a level after")
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--config",
        choices=("bare", "quickstart"),
        default="bare",
        help="chatforge's serving settings: bare, the guard off; quickstart, serve/quickstart.yaml's guard",
    )
    parser.add_argument(
        "--peer",
        choices=("transformers",),
        help="then run the same levels on `transformers serve --continuous-batching`, same model (default: none)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one last line of JSON")
    args = parser.parse_args()
    args.levels = sorted({int(c) for c in args.concurrency.split(",")})

    import ray
    from ray import serve

    from chatforge.config import EngineSpec
    from chatforge.serve.app import build_app

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="chatforge-serve-bench-") as tmp:
        model = resolve_model(args.model) if args.model else str(build_default_model(Path(tmp) / "model"))
        if args.peer:
            model = sampling_view(model, Path(tmp) / "served")
        say(f"model: {model}")
        db = str(Path(tmp) / "feedback.db")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        result: dict = {
            "model": args.model or "default config (random weights)",
            "max_tokens": args.max_tokens,
            "stream": args.stream,
            "max_batch_size": args.max_batch_size,
            "torch_threads": args.torch_threads,
            "cpus": os.cpu_count(),
            "config": args.config,
            "guard": guard_of(args.config),
            "feedback_store": "sqlite (temp file)",
            "levels": {},
        }
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(serve_args(model, args.max_batch_size, args, db)), name="chatforge", route_prefix="/")
            cpu = ServerCpu(os.getpid(), include_root=False)  # the Ray cluster this process started, not the client
            for level in args.levels:
                count = max(args.requests, 2 * level)
                say(f"batched, concurrency {level}: {count} requests")
                result["levels"][str(level)] = asyncio.run(http_level(url, level, count, args, failures, cpu=cpu))
                say(json.dumps(result["levels"][str(level)]))
            top = max(args.levels)
            say(f"max_batch_size=1, concurrency {top}")
            serve.run(build_app(serve_args(model, 1, args, db)), name="chatforge", route_prefix="/")
            unbatched = asyncio.run(http_level(url, top, max(args.requests, 2 * top), args, failures, cpu=cpu))
            result["unbatched"] = {str(top): unbatched}
            say(json.dumps(unbatched))
            batched_tps = result["levels"][str(top)]["tokens_per_s"]
            result["batching_gain"] = (
                round(batched_tps / unbatched["tokens_per_s"], 2) if unbatched["tokens_per_s"] else None
            )
        finally:
            serve.shutdown()
            ray.shutdown()
        if args.peer:
            result["peer"] = run_peer(model, args, Path(tmp))
            result["ratio"] = {
                level: ratios(figures, result["peer"]["levels"][level]) for level, figures in result["levels"].items()
            }
        if 1 in args.levels:
            say("direct Engine.complete, concurrency 1")
            spec = EngineSpec(
                max_batch_size=args.max_batch_size,
                default_max_tokens=max(args.max_tokens, 16),
                max_tokens_limit=max(args.max_tokens, 16),
                torch_threads=args.torch_threads,
            )
            direct = direct_latency(model, spec, max(args.requests, 2), args)
            result["direct"] = direct
            result["overhead_ms"] = round(result["levels"]["1"]["p50_ms"] - direct["p50_ms"], 1)
        result["failed_requests"] = len(failures)
        result["failures_sample"] = failures[:5]
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
