"""The benchmark scripts run end to end on tiny settings: a measurement that cannot run is not a measurement.

Nothing here is timed; the figures these runs print are too small to mean anything. What is checked is that each
side ran and that the JSON holds what docs/benchmarks.md reports.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_curate import ENV

from helpers.corpus import write_sharegpt_jsonl
from helpers.train_data import write_curated

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _bench(*args: str, timeout: int = 600) -> dict:
    result = subprocess.run(
        [sys.executable, *args, "--json"],
        capture_output=True,
        text=True,
        env={**ENV, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_train_overhead_runs_both_sides_and_the_memory_runs(tmp_path):
    data = write_curated(tmp_path / "curated")
    tiny = ["--steps", "4", "--warmup", "2", "--log-every", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2"]
    figures = _bench(
        "benchmarks/train_overhead.py",
        *tiny,
        *("--max-length", "64", "--batch-size", "2", "--data", str(data), "--workdir", str(tmp_path / "bench")),
        *("--pairs", "1"),
    )

    assert figures["ray_tokens_per_s"] > 0 and figures["torchrun_tokens_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["ray_tokens_per_s"] / figures["torchrun_tokens_per_s"], rel=1e-3)
    assert figures["wall_ratio"] == pytest.approx(figures["torchrun_wall_s"] / figures["ray_wall_s"], rel=1e-3)
    fixed = figures["ray_fixed_cost_s"]
    assert set(fixed) == {"start_s", "prepare_s", "fit_beyond_steps_s", "export_s", "steps_at_steady_rate_s"}
    assert fixed["start_s"] > 0 and fixed["prepare_s"] > 0 and fixed["export_s"] >= 0
    assert len(figures["ray_windows_tokens_per_s"]) == len(figures["torchrun_windows_tokens_per_s"]) == 2
    # the same tokenizer, packing and loop on both sides: the same packing efficiency, losses close after 4 steps
    assert figures["packing_efficiency"] == figures["torchrun_packing_efficiency"]
    assert 0 < figures["packing_efficiency"] <= 1
    assert figures["ray_final_loss"] == pytest.approx(figures["torchrun_final_loss"], abs=0.25)
    assert (tmp_path / "bench" / "torchrun1" / "model" / "model.safetensors").exists()  # the baseline exported too

    zero0, zero3 = (figures["memory_per_worker"][f"zero{stage}"] for stage in (0, 3))
    assert zero0["measured_bytes"]["total"] == pytest.approx(zero0["arithmetic_bytes"]["total"], rel=0.01)
    assert zero3["measured_bytes"]["gradients"] < zero0["measured_bytes"]["gradients"]
    assert zero3["measured_bytes"]["optimizer_state"] < zero0["measured_bytes"]["optimizer_state"]


def test_curate_benchmark_sides_keep_the_same_rows_and_memory_is_sampled(tmp_path):
    figures = _bench("benchmarks/curate.py", "--n", "1000", "--pairs", "1", "--skip-memory")
    # the single-process loop runs the same functions, dedup's verification included: the same rows survive
    assert figures["kept_ray"] == figures["kept_single_process"] > 0
    assert figures["dropped_ray"] == figures["dropped_single_process"]
    assert figures["dropped_ray"].get("duplicate:near", 0) > 0  # the corpus carries near-copies
    assert figures["speedup_2cpu_vs_1cpu"] > 0 and figures["ray_1cpu_error"] is None
    # the memory runs' sampler, on one run of its own (the 1x/4x memory runs and the 4x speed-up repeat it at sizes)
    import importlib.util

    module = importlib.util.spec_from_file_location("curate_bench", ROOT / "benchmarks" / "curate.py")
    bench = importlib.util.module_from_spec(module)
    module.loader.exec_module(bench)
    corpus = tmp_path / "corpus.jsonl"
    write_sharegpt_jsonl(corpus, 300, seed=2)
    sampled = bench.run_ray(str(corpus), str(tmp_path / "out"), 2, sample_memory=True)
    assert sampled["manifest"]["input_records"] == 300
    assert sampled["peak_pss_mb"] > 100 and sum(sampled["peak_by_process_mb"].values()) > 0


def test_json_reader_benchmark_measures_each_reader_in_its_own_process():
    figures = _bench("benchmarks/json_reader.py", "--sizes", "0.25", "--readers", "chatforge", "chatforge_64k")
    row = figures["results"]["0.25MiB"]
    assert [e["error"] for e in row["chatforge"]["elements"]] == [None, None, None]
    assert [e["error"] for e in row["chatforge_64k"]["elements"]] == [None, "record_too_large", None]
    assert all(row[r]["seconds"] >= 0 and row[r]["peak_mib"] >= 0 for r in ("chatforge", "chatforge_64k"))


def test_serve_benchmark_smoke_run_serves_every_request_on_both_sides():
    figures = _bench(
        "benchmarks/serve.py",
        *("--requests", "4", "--max-tokens", "8", "--concurrency", "1,2", "--peer", "transformers"),
    )
    assert figures["failed_requests"] == 0 and figures["config"] == "bare"
    peer = figures["peer"]
    assert peer["failed_requests"] == 0, peer["failures_sample"]
    for level in ("1", "2"):
        for side in (figures["levels"][level], peer["levels"][level]):
            assert side["requests"] == 4
            assert side["completion_tokens"] == 4 * 8
            assert side["cpu_ms_per_token"] > 0
        assert set(figures["ratio"][level]) == {"tokens_per_s", "p50_ms", "p99_ms", "cpu_ms_per_token"}
        assert figures["ratio"][level]["tokens_per_s"] > 0
    assert figures["direct"]["completion_tokens"] == 4 * 8 and figures["batching_gain"] > 0


def test_serve_benchmark_streams_the_embedded_model_and_times_the_first_token():
    figures = _bench(
        "benchmarks/serve.py",
        "--model",
        "smollm2",
        "--stream",
        "--requests",
        "2",
        "--max-tokens",
        "4",
        "--concurrency",
        "1",
    )
    assert figures["failed_requests"] == 0 and figures["stream"] is True
    level = figures["levels"]["1"]
    assert level["completion_tokens"] == 2 * 4
    assert 0 < level["ttft_p50_ms"] <= level["p50_ms"]


def test_quickstart_quality_compares_base_and_fine_tuned_perplexity(tmp_path):
    from helpers.tiny_model import save_tiny_model
    from helpers.train_data import write_curated

    data = write_curated(tmp_path / "curated", n_train=4, n_val=4)
    (data / "test").symlink_to(data / "val")
    model = save_tiny_model(tmp_path / "model")
    figures = _bench(
        "benchmarks/quickstart_quality.py",
        "--data",
        str(data),
        "--model",
        str(model),
        "--base",
        str(model),
        "--max-length",
        "128",
    )
    assert figures["base"]["tokens"] == figures["fine_tuned"]["tokens"] > 0
    assert figures["ratio"] == pytest.approx(1.0)


def test_compat_benchmark_measures_each_entry_on_and_off():
    figures = _bench("benchmarks/compat.py", "--runs", "1", "--probes", "curate")
    curate = figures["probes"]["curate"]
    assert set(curate) == {"on", "off:local_ray_env"}
    assert all(config["wall_s"]["median"] > 0 for config in curate.values())
