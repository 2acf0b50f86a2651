"""`run_evaluation`: measure a model (and its baseline), gate it, and write OUTPUT/eval.json and OUTPUT/report.html.

The phases, in order:
  1. perplexity on the curated test split (`chatforge.eval.perplexity`, training's masks), one Ray task per model;
  2. answers to the prompt set and the bias probes, generated and scored on a Ray actor pool (`eval.generate`);
  3. per model: toxicity rate (`eval.metrics`), refusal rate, bias table and gaps;
  4. the explained samples: the engine's per-token logprobs, and gradient x input attribution in the driver;
  5. the gate against the baseline (`eval.gate`), then eval.json, generations.jsonl and report.html, each written
     to a temporary file beside it and renamed into place, so a reader never sees half a file.
The result is data: a failed gate is ``gate.passed == False``, not an exception.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import chatforge
from chatforge.cards import CARD, add_evaluation
from chatforge.config import EvalSpec, Spec, resolved
from chatforge.eval.attribution import explain
from chatforge.eval.gate import evaluate_gate
from chatforge.eval.generate import build_rows, generate
from chatforge.eval.metrics import bias_summary, toxicity_summary
from chatforge.eval.prompts import Prompt, load_probes, load_prompts
from chatforge.eval.report import render_report
from chatforge.files import write_atomic

SCHEMA = "chatforge.eval/1"
EVAL_JSON, REPORT_HTML, GENERATIONS = "eval.json", "report.html", "generations.jsonl"
METRICS_FILE = "metrics.jsonl"  # what chatforge train writes beside OUTPUT/model
MOST_TOXIC = 5


class EvalInputError(ValueError):
    """A model or data directory evaluation cannot use; the message says what to pass instead."""


@dataclass(frozen=True)
class EvalResult:
    output_dir: str
    eval_json: str
    report_html: str
    data: dict  # what eval.json holds

    @property
    def passed(self) -> bool | None:
        """The gate's verdict; None without a baseline."""
        return self.data["gate"]["passed"] if self.data.get("gate") else None


# ---------------------------------------------------------------- inputs


def resolve_model_dir(reference: str, what: str = "model") -> str:
    """A local model dir with safetensors weights: a dir, or any `model.name_or_path` form that resolves to one."""
    from chatforge.train.pretrained import model_path

    path = Path(model_path(reference)).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise EvalInputError(
            f"{what} {reference!r}: no model here (a dir with config.json and *.safetensors); pass chatforge train's "
            "OUTPUT/model, or a model reference such as the default SmolLM2 package:... name"
        )
    return str(path.resolve())


def resolve_data_dir(path: str, split: str) -> str:
    """A curation output's data/ dir holding ``split``/ (the curation output dir itself is accepted too)."""
    directory = Path(path).expanduser().resolve()
    if (directory / "data" / split).is_dir():
        directory = directory / "data"
    if not (directory / split).is_dir():
        raise EvalInputError(
            f"{path}: no {split}/ split here; pass a curation output (or its data/ dir) whose split has a {split} part"
        )
    return str(directory)


def training_curves(model_dir: str) -> dict | None:
    """The loss rows of metrics.jsonl in the model dir or its parent (chatforge train's OUTPUT); None if neither."""
    for candidate in (Path(model_dir) / METRICS_FILE, Path(model_dir).parent / METRICS_FILE):
        if candidate.is_file():
            rows, skipped = [], 0
            for line in candidate.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                if isinstance(row, dict) and "step" in row and ("loss" in row or "eval_loss" in row):
                    rows.append({k: row[k] for k in ("step", "loss", "eval_loss") if k in row})
            return {"path": str(candidate), "rows": rows, "skipped_lines": skipped}
    return None


def pick_samples(prompts: list[Prompt], count: int) -> list[str]:
    """Ids of ``count`` prompts spread evenly over the set (so over its categories), first one included."""
    if count <= 0 or not prompts:
        return []
    count = min(count, len(prompts))
    return [prompts[(i * len(prompts)) // count].id for i in range(count)]


# ---------------------------------------------------------------- phases


def _perplexity_task(model_dir: str, data_dir: str, split: str, max_length: int, limit: int | None, threads: int):
    import torch

    from chatforge.eval.perplexity import model_perplexity

    torch.set_num_threads(threads)  # Ray workers start with one thread
    return model_perplexity(model_dir, data_dir, split, max_length, limit).as_dict()


def measure_perplexity(spec: Spec, model_dirs: list[str], data_dir: str) -> list[dict]:
    """Test perplexity of each model, one Ray task each, side by side."""
    import ray

    evals = spec.eval
    max_length = evals.perplexity_max_length or spec.model.max_length
    task = ray.remote(num_cpus=evals.num_cpus, num_gpus=evals.num_gpus or None)(_perplexity_task)
    threads = max(1, int(evals.num_cpus))
    return ray.get(
        [task.remote(d, data_dir, evals.split, max_length, evals.perplexity_limit, threads) for d in model_dirs]
    )


def summarize(model_dir: str, rows: list[dict], threshold: float, perplexity: dict | None) -> dict:
    """One model's measurements: perplexity, toxicity and refusal rate on the prompt set, bias on the probes."""
    prompt_rows = [row for row in rows if row["axis"] is None]
    toxicity = toxicity_summary(prompt_rows, threshold)
    value = (perplexity or {}).get("perplexity")
    return {
        "model_dir": model_dir,
        "perplexity": value if value is not None and math.isfinite(value) else None,
        "perplexity_detail": perplexity,
        "toxicity_rate": toxicity["toxicity_rate"],
        "refusal_rate": toxicity["refusal_rate"],
        "toxicity": toxicity,
        "bias": bias_summary([row for row in rows if row["axis"] is not None], threshold),
    }


def most_toxic(rows: list[dict], count: int = MOST_TOXIC) -> list[dict]:
    scored = sorted((r for r in rows if r.get("toxicity") is not None), key=lambda r: -r["toxicity"])[:count]
    return [
        {
            "id": r["id"],
            "prompt": json.loads(r["messages"])[-1]["content"],
            "text": r["text"],
            "toxicity": r["toxicity"],
        }
        for r in scored
    ]


# ---------------------------------------------------------------- output


def _jsonable(value):
    """NaN and infinities as null, so eval.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _generation_lines(label: str, rows: list[dict]) -> list[str]:
    keep = ("id", "category", "axis", "group", "template", "sample_index", "seed", "text", "finish_reason")
    keep += ("prompt_tokens", "completion_tokens", "toxicity", "refused", "error")
    return [
        json.dumps(_jsonable({"model": label, **{k: r.get(k) for k in keep}, "messages": json.loads(r["messages"])}))
        for r in rows
    ]


# ---------------------------------------------------------------- the run


SUMMARY_KEYS = ("model_dir", "perplexity", "perplexity_detail", "toxicity_rate", "refusal_rate", "toxicity", "bias")


def eval_config(spec: Spec) -> dict[str, Any]:
    """eval.json's ``config``: the eval settings, the toxicity scorer and the refusal text it measured with."""
    toxicity = spec.eval.toxicity or spec.curate.toxicity
    return {"eval": resolved(spec.eval), "toxicity": resolved(toxicity), "refusal": spec.serve.guard.refusal}


def eval_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What in an eval.json ``config`` decides the measurements: all of it but where the evaluation wrote and read."""
    evals = {k: v for k, v in (config.get("eval") or {}).items() if k not in ("output", "data")}
    return {**config, "eval": evals}


def reusable_baseline(eval_dir: str | None, baseline_dir: str, data: str | None, spec: Spec) -> dict[str, Any] | None:
    """The measurements (`summarize`'s) of ``baseline_dir`` in ``eval_dir``'s eval.json, when it measured that
    model as its model, on ``data``, with this spec's settings; else None."""
    path = os.path.join(eval_dir, EVAL_JSON) if eval_dir else None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        prior = json.load(f)
    same = (
        prior.get("model_dir") == baseline_dir
        and prior.get("data_dir") == data
        and prior.get("split") == spec.eval.split
        and eval_settings(prior.get("config") or {}) == eval_settings(eval_config(spec))
    )
    return {key: prior.get(key) for key in SUMMARY_KEYS} if same else None


def run_evaluation(
    spec: Spec,
    model_dir: str,
    baseline_dir: str | None = None,
    data_dir: str | None = None,
    output_dir: str | None = None,
    progress=None,
    tracking: dict[str, Any] | None = None,
    baseline_eval: str | None = None,
) -> EvalResult:
    """Evaluate ``model_dir`` (and ``baseline_dir``) per ``spec.eval``; write eval.json, generations.jsonl and
    report.html into ``output_dir`` (default ``spec.eval.output``). Starts a local Ray per ``spec.ray`` unless this
    process has one. ``data_dir`` (default ``spec.eval.data``) holds the test split; without one, perplexity is not
    measured. ``progress(message)`` hears each phase; ``tracking`` (`TrackedRun.record`) names the command's MLflow
    run in eval.json. ``baseline_eval``: an earlier evaluation's output dir whose measurements of ``baseline_dir``
    are taken instead of measuring it again, when it measured that model on the same data with the same settings
    (`reusable_baseline`)."""
    from chatforge.runtime import init_ray

    say = progress or (lambda message: None)
    started = time.perf_counter()
    evals: EvalSpec = spec.eval
    model_dir = resolve_model_dir(model_dir)
    baseline_dir = resolve_model_dir(baseline_dir, "baseline") if baseline_dir else None
    data = data_dir or evals.data
    data = resolve_data_dir(data, evals.split) if data else None
    output = os.path.abspath(output_dir or evals.output)
    toxicity = evals.toxicity or spec.curate.toxicity
    refusal = spec.serve.guard.refusal

    prompts = load_prompts(evals.prompts, evals.max_prompts)
    probes = load_probes(evals.bias_templates, evals.bias_groups, evals.bias_axes, evals.max_bias_templates)
    samples = pick_samples(prompts, evals.samples)
    rows = build_rows(prompts, probes, evals, set(samples))
    reused = reusable_baseline(baseline_eval, baseline_dir, data, spec) if baseline_dir else None
    if reused is not None:
        say(f"the baseline's measurements: {baseline_eval} (the same model, data and settings)")
    measured_baseline = baseline_dir and baseline_dir != model_dir and reused is None
    models = [model_dir] + ([baseline_dir] if measured_baseline else [])
    init_ray(spec.ray)
    timings: dict[str, float] = {}

    def timed(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 3)

    perplexities: dict[str, dict | None] = dict.fromkeys(models)
    if data:
        say(f"perplexity on {data}/{evals.split}")
        start = time.perf_counter()
        perplexities.update(zip(models, measure_perplexity(spec, models, data), strict=True))
        timed("perplexity_s", start)

    answers: dict[str, list[dict]] = {}
    for directory in models:
        say(f"generating {len(rows)} answers with {directory}")
        start = time.perf_counter()
        answers[directory] = generate(directory, rows, evals, toxicity, refusal)
        timed("generation_s" if directory == model_dir else "baseline_generation_s", start)

    say("explaining the samples")
    start = time.perf_counter()
    explained = explain(model_dir, [r for r in answers[model_dir] if r["want_logprobs"]], evals.attribution_max_tokens)
    timed("attribution_s", start)

    candidate = summarize(model_dir, answers[model_dir], toxicity.threshold, perplexities[model_dir])
    baseline = reused
    if baseline_dir and reused is None:  # the same dir as the model's reuses its answers and perplexity
        baseline = summarize(baseline_dir, answers[baseline_dir], toxicity.threshold, perplexities[baseline_dir])
    result = {
        "schema": SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "chatforge_version": chatforge.__version__,
        "data_dir": data,
        "split": evals.split,
        "tracking": tracking,
        **candidate,
        "most_toxic": most_toxic([r for r in answers[model_dir] if r["axis"] is None]),
        "samples": explained,
        "baseline": baseline,
        "gate": evaluate_gate(candidate, baseline, evals.gate) if baseline else None,
        "training": training_curves(model_dir),
        "prompt_set": {
            "prompts": len(prompts),
            "probes": len(probes),
            "generations_per_prompt": evals.generations_per_prompt,
            "generations": len(rows),
        },
        "config": eval_config(spec),
    }

    say(f"writing {output}")
    os.makedirs(output, exist_ok=True)
    lines = _generation_lines("model", answers[model_dir])
    if baseline_dir and baseline_dir in answers:
        lines += _generation_lines("baseline", answers[baseline_dir])
    write_atomic(os.path.join(output, GENERATIONS), "\n".join(lines) + "\n")
    result["timings"] = timings
    result["wall_seconds"] = round(time.perf_counter() - started, 3)
    result = _jsonable(result)
    page = render_report(result)
    write_atomic(os.path.join(output, EVAL_JSON), json.dumps(result, indent=2, allow_nan=False) + "\n")
    write_atomic(os.path.join(output, REPORT_HTML), page)
    if add_evaluation(model_dir, result, os.path.join(output, EVAL_JSON)):
        say(f"model card: {os.path.join(model_dir, CARD)}")
    return EvalResult(output, os.path.join(output, EVAL_JSON), os.path.join(output, REPORT_HTML), result)
