"""The path users run, on the embedded SmolLM2-135M-Instruct, as one command: `chatforge run` of the quickstart spec
(curation, training and evaluation shortened) curates a corpus, LoRA fine-tunes with Ray Train and DeepSpeed,
exports, evaluates, serves, answers simulated users, learns from their ratings in one loop cycle, deploys its candidate
as a canary on the running app and stops the server; summary.json says so and links data -> run -> model ->
deployment."""

import json
import sqlite3

import pytest
from test_cli_curate import chatforge

from helpers.corpus import write_sharegpt_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHORT = [
    "ray.num_cpus=2",
    "model.max_length=128",
    "train.max_steps=3",
    "train.batch_size=1",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=3",
    "eval.max_prompts=4",
    "eval.max_bias_templates=1",
    "eval.samples=1",
    "eval.perplexity_limit=8",
    "eval.max_new_tokens=16",
    "loop.settle_s=1",
    "loop.max_steps=3",
    # any candidate passes, so the cycle deploys it as a canary (the gate itself is tested in test_eval)
    "eval.gate.max_perplexity_increase=100",
    "eval.gate.max_toxicity_increase=1",
    "eval.gate.max_bias_gap=1",
]


def test_chatforge_run_takes_the_quickstart_from_data_to_a_served_model_and_one_loop_cycle(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_sharegpt_jsonl(corpus, 200)
    out = tmp_path / "run"
    source = f"curate.sources=[{{name: small, format: sharegpt, path: {corpus}}}]"
    args = ["run", "pipelines/quickstart.yaml", source, *SHORT, "--ratings", "6", "--output", str(out)]
    result = chatforge(*args, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [
        ("curate", "ok"),
        ("train", "ok"),
        ("eval", "ok"),
        ("serve", "ok"),
        ("loop", "ok"),
    ]
    assert [link["kind"] for link in summary["lineage"]] == [
        "data",
        "curation",
        "training",
        "model",
        "eval",
        "deployment",
        "deployment",  # the canary
    ]
    stages = {s["name"]: s for s in summary["stages"]}

    # the real-weights path: SmolLM2 loaded from its GGUF, LoRA merged on export, its own chat template
    training = json.loads((out / "train" / "training.json").read_text())
    assert training["config"]["model"]["name_or_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert training["config"]["method"] == "lora"
    model = out / "train" / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152  # merged LoRA, no added tokens
    assert (model / "model.safetensors").is_file() and (out / "train" / "adapter").is_dir()
    template = (
        json.loads((model / "tokenizer_config.json").read_text()).get("chat_template")
        or (model / "chat_template.jinja").read_text()
    )
    assert "<|im_start|>" in template
    assert stages["eval"]["details"]["perplexity"] > 1 and (out / "eval" / "report.html").is_file()

    # served: the smoke answer is words, and every simulated user's rating is in the store
    answer = stages["serve"]["details"]["smoke"]["answer"]
    words = answer.split()
    assert len(words) >= 3 and sum(w.strip(".,!?'\"").isalpha() for w in words) >= 0.6 * len(words), answer
    ratings = stages["serve"]["details"]["ratings"]
    assert ratings["asked"] == 6 and ratings["positive"] + ratings["negative_corrected"] == 6
    with sqlite3.connect(out / "serve" / "feedback.db") as db:
        assert db.execute("SELECT count(*) FROM feedback").fetchone() == (6,)
        assert db.execute("SELECT count(*) FROM completions").fetchone() == (7,)  # the smoke request, too

    # one cycle learned from exactly those ratings, fine-tuned a candidate from the served model and gated it
    cycle = json.loads((out / "loop" / "cycle-0001" / "cycle.json").read_text())
    assert cycle["feedback_ids"] == {"after": 0, "upto": 6} and cycle["rows_read"] == 6
    assert stages["loop"]["details"]["gate"]["checks"] and (out / "loop" / "cycle-0001" / "train" / "model").is_dir()
    gate_eval = json.loads((out / "loop" / "cycle-0001" / "eval" / "eval.json").read_text())
    assert "baseline_generation_s" not in gate_eval["timings"]  # the eval stage's measurements, not measured again
    assert gate_eval["baseline"]["perplexity"] == stages["eval"]["details"]["perplexity"]

    # the candidate passed and joined the running app as a canary with 10% of the traffic, through its dashboard
    deployment = cycle["deployment"]
    assert cycle["eval"]["gate"]["passed"] and deployment["action"] == "deploy"
    assert deployment["canary"] == "candidate-0001" and deployment["model"] == cycle["candidate_model"]
    assert deployment["weights"] == {"chatforge-quickstart": pytest.approx(0.9), "candidate-0001": 0.1}
    assert summary["lineage"][-1]["path"] == cycle["candidate_model"]
    server_log = (out / "serve" / "serve.log").read_text()
    assert "deployed from a config" in server_log
    assert "stopping" in server_log  # the server was stopped by the run, in order


def test_a_failing_stage_stops_the_run_and_summary_json_says_where(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere.jsonl"
    source = f"curate.sources=[{{name: gone, format: sharegpt, path: {missing}}}]"
    result = chatforge("run", "pipelines/quickstart.yaml", source, "--output", str(out), timeout=600)
    assert result.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed at curate"
    curate, *rest = summary["stages"]
    assert curate["name"] == "curate" and "nowhere.jsonl" in curate["status"]
    assert all(stage["status"] == "not run" for stage in rest)
    assert "failed at curate" in result.stderr and "nowhere.jsonl" in result.stderr
