"""The pictures in docs/serving.md: the Ray dashboard's Serve view and chatforge's metrics under a changing load.

    .venv/bin/python docs/tools/serve_views.py                      # the demo's model (runs/quickstart/train/model)
    .venv/bin/python docs/tools/serve_views.py --model DIR --out docs/img

Starts a local Ray (2 CPUs, dashboard on 127.0.0.1) and chatforge's Serve app with two variants of ``--model``
(``main`` 80% / ``canary`` 20%, ``main`` autoscaling 1-2 replicas), then drives it for a few minutes: a quiet
phase (1 client), a busy one (24 clients, some toxic prompts that the input guard refuses, ratings posted for
answers), and a quiet one again. Meanwhile it scrapes Ray's metrics export every 2 s. At the busy peak it takes a
screenshot of the dashboard's Serve page with headless Chromium (skipped, with a note, when none is installed);
at the end it plots every chatforge metric over time. Writes ``OUT/ray-dashboard-serve.png`` and
``OUT/serving-metrics.png``; prints the paths as JSON. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from helpers.network import free_port  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112 (a Ray config name)

WORDS = "river garden morning coffee train window music letter mountain bread winter city friend story".split()
TOXIC = "shut up you stupid fucking idiot"
PHASES = (("quiet", 1, 40.0), ("busy", 24, 100.0), ("cooling", 1, 80.0))  # name, clients, seconds


def say(message: str) -> None:
    print(f"[serve-views] {message}", file=sys.stderr, flush=True)


def serve_args(model: str, db: str) -> dict:
    engine = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01, "default_max_tokens": 24, "max_tokens_limit": 64}
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 6,
        "upscale_delay_s": 5,
        "downscale_delay_s": 20,
        "look_back_period_s": 5,
        "metrics_interval_s": 1,
    }
    return {
        "variants": [
            {
                "name": "main",
                "model": model,
                "weight": 80,
                "engine": engine,
                "num_cpus": 0.5,
                "max_ongoing_requests": 32,
                "autoscaling": autoscaling,
            },
            {
                "name": "canary",
                "model": model,
                "weight": 20,
                "engine": engine,
                "num_cpus": 0.5,
                "max_ongoing_requests": 32,
            },
        ],  # fmt: skip
        "guard": {"input_policy": "block", "output_policy": "flag"},
        "auth": {"anonymous": True},
        "feedback": {"url": f"sqlite:///{db}", "url_env": None},
        "ingress_num_cpus": 0.25,
    }


# ---------------------------------------------------------------- load


async def drive(url: str, stop_at: float, clients: int, stats: dict) -> None:
    import httpx

    rng = random.Random(clients)

    async def client(n: int, http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            toxic = rng.random() < 0.05
            text = TOXIC if toxic else " ".join(rng.choices(WORDS, k=rng.randint(4, 16)))
            body = {
                "messages": [{"role": "user", "content": text}],
                "max_tokens": rng.randint(8, 24),
                "user": f"user-{rng.randrange(200)}",
            }
            response = await http.post("/v1/chat/completions", json=body)
            stats[response.status_code] += 1
            if response.status_code == 200 and rng.random() < 0.3:
                rating = rng.choice((-1, 0, 1, 1))
                await http.post("/v1/feedback", json={"completion_id": response.json()["id"], "rating": rating})

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(n, http) for n in range(clients)))


# ---------------------------------------------------------------- metrics scraping and plotting


def scrape(metrics_url: str) -> dict[tuple[str, tuple], float]:
    """Every ``ray_chatforge_*`` sample of one scrape: (name, sorted labels without per-process ones) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values: dict[tuple[str, tuple], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("ray_chatforge_"):
            continue
        for sample in family.samples:
            keep = {
                k: v
                for k, v in sample.labels.items()
                if k in ("variant", "status", "kind", "state", "where", "rating", "le")
            }
            values[(sample.name, tuple(sorted(keep.items())))] += sample.value  # summed over replicas
    return values


def series(
    scrapes: list[tuple[float, dict]], name: str, group: str | None = None, where: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Per value of the label ``group``: a metric's value summed over the other labels, at every scrape; only the
    samples whose labels include ``where``."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(scrapes))
    for i, (_t, values) in enumerate(scrapes):
        for (sample, labels), value in values.items():
            tags = dict(labels)
            if sample == name and all(tags.get(k) == v for k, v in (where or {}).items()):
                out[tags.get(group, "all") if group else "all"][i] += value
    return dict(out)


def rates(times: list[float], totals: list[float], window: int = 3) -> list[float]:
    return [
        (totals[i] - totals[max(0, i - window)]) / max(1e-9, times[i] - times[max(0, i - window)]) if i else 0.0
        for i in range(len(times))
    ]


def quantiles(scrapes: list[tuple[float, dict]], name: str, q: float, window: int = 5) -> list[float | None]:
    """``histogram_quantile(q, increase(name_bucket[window scrapes]))`` over all labels but ``le``."""
    buckets: list[dict[float, float]] = []
    for _t, values in scrapes:
        per_le: dict[float, float] = defaultdict(float)
        for (sample, labels), value in values.items():
            if sample == f"{name}_bucket":
                per_le[float(dict(labels)["le"])] += value
        buckets.append(per_le)
    out: list[float | None] = []
    for i, now in enumerate(buckets):
        before = buckets[max(0, i - window)]
        edges = sorted(now)
        counts = [now[e] - before.get(e, 0.0) for e in edges]
        total = counts[-1] if counts else 0.0
        if total <= 0:
            out.append(None)
            continue
        rank, lower, below = q * total, 0.0, 0.0
        value = None
        for edge, cumulative in zip(edges, counts):
            if cumulative >= rank:
                upper = edge if edge != float("inf") else lower
                share = (rank - below) / max(1e-9, cumulative - below)
                value = lower + (upper - lower) * share
                break
            lower, below = edge, cumulative
        out.append(value)
    return out


def plot(scrapes: list[tuple[float, dict]], phases: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = scrapes[0][0]
    t = [stamp - start for stamp, _ in scrapes]
    fig, axes = plt.subplots(4, 2, figsize=(13, 12), sharex=True)
    panels = axes.ravel()

    def lines(ax, named: dict[str, list], title: str, unit: str) -> None:
        for label, ys in sorted(named.items()):
            ax.plot(t, [float("nan") if y is None else y for y in ys], label=label)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        if named:
            ax.legend(fontsize=8, loc="upper right")

    per_status = series(scrapes, "ray_chatforge_requests_total", "status")
    lines(
        panels[0],
        {k: rates(t, v) for k, v in per_status.items()},
        "requests by outcome (ray_chatforge_requests_total)",
        "req/s",
    )
    tokens = {
        k: rates(t, v)
        for k, v in series(scrapes, "ray_chatforge_tokens_total", "variant", {"kind": "completion"}).items()
    }
    lines(panels[1], tokens, "completion tokens per variant (ray_chatforge_tokens_total)", "tokens/s")
    lines(
        panels[2],
        {f"p{int(q * 100)}": quantiles(scrapes, "ray_chatforge_request_latency_seconds", q) for q in (0.5, 0.99)},
        "latency (ray_chatforge_request_latency_seconds)",
        "s",
    )
    batch_sum = series(scrapes, "ray_chatforge_batch_size_sum").get("all", [0.0] * len(t))
    batch_count = series(scrapes, "ray_chatforge_batch_size_count").get("all", [0.0] * len(t))
    mean_batch = [s / c if c else None for s, c in zip(rates(t, batch_sum), rates(t, batch_count))]
    lines(panels[3], {"mean": mean_batch}, "requests per @serve.batch call (ray_chatforge_batch_size)", "requests")
    lines(panels[4], series(scrapes, "ray_chatforge_engine_sequences", "state"),
          "engine sequences, all replicas (ray_chatforge_engine_sequences)", "sequences")  # fmt: skip
    lines(panels[5], series(scrapes, "ray_chatforge_guard_blocks_total", "where"),
          "guard refusals, cumulative (ray_chatforge_guard_blocks_total)", "count")  # fmt: skip
    lines(panels[6], series(scrapes, "ray_chatforge_feedback_total", "rating"),
          "ratings, cumulative (ray_chatforge_feedback_total)", "count")  # fmt: skip
    per_variant = series(scrapes, "ray_chatforge_requests_total", "variant")
    lines(panels[7], {k: rates(t, v) for k, v in per_variant.items() if k != "none"},
          "requests per A/B variant", "req/s")  # fmt: skip
    for ax in panels:
        for name, begin, end in phases:
            ax.axvspan(begin - start, end - start, alpha=0.06 if name == "busy" else 0.0, color="tab:red")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds (shaded: 24 clients; before and after: 1 client)")
    fig.suptitle("chatforge serving metrics, scraped from Ray's metrics export every 2 s", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------- the dashboard


def screenshot(url: str, path: Path) -> str | None:
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        return "no chromium on PATH (apt-get install chromium): dashboard screenshot skipped"
    command = [
        browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1440,1000",
        "--virtual-time-budget=20000", f"--screenshot={path}", url,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return None if path.exists() else f"chromium failed: {result.stderr[-500:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "runs/quickstart/train/model"))
    parser.add_argument("--out", default=str(ROOT / "docs/img"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import serve

    from chatforge.serve.app import build_app

    dashboard_port, metrics_port, http_port = free_port(), free_port(), free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    db = Path(tempfile.mkdtemp(prefix="serve-views-")) / "feedback.db"
    serve.run(build_app(serve_args(str(Path(args.model).resolve()), str(db))), name="chatforge", route_prefix="/")
    say(f"serving on 127.0.0.1:{http_port}, dashboard http://127.0.0.1:{dashboard_port}")

    scrapes: list[tuple[float, dict]] = []
    done = threading.Event()

    def scraper() -> None:
        while not done.is_set():
            try:
                scrapes.append((time.time(), scrape(f"http://127.0.0.1:{metrics_port}/metrics")))
            except OSError as error:
                say(f"scrape failed: {error}")
            done.wait(2.0)

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    stats: dict[int, int] = defaultdict(int)
    phases = []
    result: dict[str, str | None] = {}  # the screenshot's note, set by the timer thread
    shot = out / "ray-dashboard-serve.png"
    for name, clients, seconds in PHASES:
        say(f"{name}: {clients} client(s) for {seconds:.0f} s")
        begin = time.time()
        if name == "busy":
            timer = threading.Timer(
                seconds * 0.7,
                lambda: result.update(note=screenshot(f"http://127.0.0.1:{dashboard_port}/#/serve", shot)),
            )
            timer.start()
        asyncio.run(drive(f"http://127.0.0.1:{http_port}", time.monotonic() + seconds, clients, stats))
        if name == "busy":
            timer.join()
        phases.append((name, begin, time.time()))
    done.set()
    thread.join()
    serve.shutdown()
    ray.shutdown()
    metrics_png = out / "serving-metrics.png"
    plot(scrapes, phases, metrics_png)
    say(f"requests by HTTP status: {dict(stats)}")
    note = result.get("note")
    report = {"metrics_plot": str(metrics_png), "dashboard": None if note else str(shot), "note": note,
              "scrapes": len(scrapes), "statuses": dict(stats)}  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
