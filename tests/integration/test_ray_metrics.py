"""Curation and training export their progress as Ray metrics, as serving does: scraped from the node's metrics port
(what Prometheus and Grafana read, `cluster/grafana/chatforge.json`) while they run."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from chatforge.config import load_spec
from chatforge.data.pipeline import run_curation
from chatforge.train.trainer import run_training
from helpers.corpus import write_sharegpt_jsonl
from helpers.network import free_port
from helpers.train_data import TINY_TRAINING, write_curated

pytestmark = pytest.mark.integration
REPORT_INTERVAL_ENV = "RAY_metrics_report_interval_ms"  # Ray's own name, lower case


@pytest.fixture(scope="module")
def ray_metrics():
    """A 2-CPU local Ray whose processes report their metrics every half second, on a metrics port of its own."""
    import ray

    port = free_port()
    os.environ[REPORT_INTERVAL_ENV] = "500"  # read by the processes ray.init starts
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    finally:
        del os.environ[REPORT_INTERVAL_ENV]
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield f"http://127.0.0.1:{port}/metrics"
    ray.shutdown()


class Scraper:
    """Scrapes the metrics endpoint every half second in a thread, keeping every ``ray_chatforge_`` line seen."""

    def __init__(self, url: str) -> None:
        self.url, self.lines, self.stop = url, set(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                text = httpx.get(self.url, timeout=5).text
                self.lines |= {line for line in text.splitlines() if line.startswith("ray_chatforge_")}
            except httpx.HTTPError:
                pass
            self.stop.wait(0.5)

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        time.sleep(2.0)  # the last report of the processes still alive
        self.stop.set()
        self.thread.join()

    def values(self, name: str) -> dict[str, float]:
        """``{labels: value}`` of ``name``'s samples (the last seen per label set)."""
        found = {}
        for line in self.lines:
            if line.startswith(name + "{"):
                labels, value = line[len(name) :].rsplit(" ", 1)
                found[labels] = max(found.get(labels, float("-inf")), float(value))
        return found


def test_curation_counts_records_by_outcome_and_reason(ray_metrics, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_sharegpt_jsonl(corpus, 40)
    with corpus.open("a") as f:
        f.write('{"id": "broken", "conversations": "not a list"}\n')
    spec = load_spec(
        None,
        [
            f"curate.sources=[{{name: small, format: sharegpt, path: '{corpus}'}}]",
            f"curate.output={tmp_path / 'out'}",
            "curate.steps=[normalize, filters, split]",
        ],
    )
    with Scraper(ray_metrics) as scraped:
        manifest = run_curation(spec).manifest
    counts = scraped.values("ray_chatforge_curate_records_total")
    kept = sum(v for labels, v in counts.items() if 'outcome="kept"' in labels)
    dropped = {labels: v for labels, v in counts.items() if 'outcome="dropped"' in labels}
    assert kept == manifest["kept"] == 40
    assert len(dropped) == 1 and list(dropped.values()) == [1.0]
    assert f'reason="{next(iter(manifest["dropped"]))}"' in next(iter(dropped))


def test_training_exports_loss_tokens_per_second_and_steps_per_run(ray_metrics, tmp_path):
    data = write_curated(tmp_path / "curated")
    spec = load_spec(
        None,
        [
            *TINY_TRAINING,
            f"train.data=[{{path: '{data}'}}]",
            f"train.output={tmp_path / 'metrics-run' / 'train'}",
            "train.max_steps=12",
            "train.log_every=2",
            "train.eval_every=6",
        ],
    )
    with Scraper(ray_metrics) as scraped:
        run_training(spec)
    tag = 'run="metrics-run/train"'
    for name in (
        "ray_chatforge_train_loss",
        "ray_chatforge_train_eval_loss",
        "ray_chatforge_train_tokens_per_second",
        "ray_chatforge_train_learning_rate",
    ):
        values = [v for labels, v in scraped.values(name).items() if tag in labels]
        assert values and all(v > 0 for v in values), (name, scraped.values(name))
    steps = [v for labels, v in scraped.values("ray_chatforge_train_steps_total").items() if tag in labels]
    assert steps and max(steps) >= 6  # counted as the run went (the last report may come after the worker ends)
