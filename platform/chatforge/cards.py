"""Model cards: a ``README.md`` in Hugging Face's format (YAML metadata, then Markdown) in every exported model dir.

Training writes it with what it knows: the base model, the data's lineage (each curation's sources, fingerprint,
and counts kept and dropped by reason, from its manifest), the training settings and final metrics. Evaluating the
model adds its results, the gate's verdict when there was a baseline, and the bias probes' largest gaps. The card's
inputs are kept beside it (``chatforge-card.json``) so evaluation can add its part and render the card again; every
figure on the card is one of those inputs, taken as is from training.json, the manifests and eval.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from chatforge.files import write_atomic

CARD = "README.md"
CARD_DATA = "chatforge-card.json"

TRAINING_KEYS = ("max_steps", "lr", "schedule", "warmup_steps", "batch_size", "grad_accum", "packing", "seed")
FINAL_KEYS = ("step", "loss", "eval_loss", "best_eval_loss", "best_step", "exported_step", "stopped_early")
EVAL_KEYS = ("perplexity", "toxicity_rate", "refusal_rate")

INTENDED_USE = (
    "A chat assistant fine-tuned with chatforge on the conversations listed under Training data, for the kind of "
    "conversation they hold. Serve it behind chatforge's guard (`serve.guard`), which scores what users send and "
    "what the model answers for toxicity."
)
LIMITATIONS = [
    "It knows what its base model and its training conversations taught it, and no more; it can state wrong things "
    "with confidence.",
    "Curation replaced the PII its detectors recognise (see the manifests' `pii_replacements`); PII in forms they do "
    "not recognise can remain in the training data and in answers.",
    "The toxicity and bias figures come from chatforge's prompt set and templated probes, scored by an automatic "
    "classifier: they compare models on the same probes, they do not certify a model as safe.",
]


def curation_lineage(data_dir: str) -> dict[str, Any]:
    """One training dataset's lineage from its curation's manifest (beside ``data_dir``); the path alone without
    one."""
    from chatforge.train.data import manifest_path, read_manifest

    manifest = read_manifest(data_dir)
    if manifest is None:
        return {"path": data_dir, "manifest": None}
    return {
        "path": data_dir,
        "manifest": manifest_path(data_dir),
        "fingerprint": manifest.get("fingerprint"),
        "sources": [
            {"name": s["name"], "format": s["format"], "files": len(s.get("files") or [])}
            for s in manifest.get("sources", [])
        ],
        "input_records": manifest.get("input_records"),
        "kept": manifest.get("kept"),
        "dropped": manifest.get("dropped", {}),
        "pii_replacements": manifest.get("pii_replacements", {}),
    }


def training_card(spec: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """The card's inputs a training run knows: ``spec`` (the resolved Spec) and its training.json ``summary``."""
    final = summary.get("final_metrics") or {}
    return {
        "name": os.path.basename(os.path.dirname(summary["model_dir"].rstrip("/"))) or "model",
        "base_model": spec.model.name_or_path,
        "method": spec.method,
        "zero_stage": spec.deepspeed.zero_stage,
        "lora": spec.lora.model_dump() if spec.method == "lora" else None,
        "workers": spec.scaling.num_workers,
        "training": {key: getattr(spec.train, key) for key in TRAINING_KEYS},
        "final_metrics": {key: final[key] for key in FINAL_KEYS if key in final},
        "data": [
            {**curation_lineage(source.path), "weight": source.weight, "tag": source.tag} for source in spec.train.data
        ],
        "fingerprint": summary.get("fingerprint"),
        "chatforge_version": summary.get("chatforge_version"),
        "created_at": summary.get("created_at"),
        "evaluation": None,
    }


def evaluation_card(result: dict[str, Any], eval_json: str) -> dict[str, Any]:
    """The card's inputs from an eval.json ``result``."""
    bias = result.get("bias") or {}
    gate = result.get("gate")
    baseline = result.get("baseline") or {}
    return {
        "eval_json": eval_json,
        **{key: result.get(key) for key in EVAL_KEYS},
        "baseline": {"model_dir": baseline.get("model_dir"), **{key: baseline.get(key) for key in EVAL_KEYS}}
        if baseline
        else None,
        "gate": {"passed": gate["passed"], "reasons": gate["reasons"]} if gate else None,
        "bias_max_gap": bias.get("max_gap", {}),
        "bias_max_gap_axis": bias.get("max_gap_axis", {}),
        "bias_probes": bias.get("probes"),
        "prompt_set": result.get("prompt_set"),
        "created_at": result.get("created_at"),
    }


def figure(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_card(card: dict[str, Any]) -> str:
    """The README.md: Hugging Face's YAML metadata block, then the card in Markdown."""
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": card["base_model"],
        "tags": ["chatforge", "conversational", *(["lora"] if card["method"] == "lora" else [])],
    }
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", "", f"# {card['name']}", ""]
    lines += [
        f"Fine-tuned from `{card['base_model']}` with chatforge {card['chatforge_version']} ({card['created_at']}): "
        f"{'LoRA' if card['method'] == 'lora' else 'full fine-tuning'}, DeepSpeed ZeRO-{card['zero_stage']}, "
        f"{card['workers']} worker(s), loss on the assistant turns only. Training data fingerprint: "
        f"`{card['fingerprint']}`.",
        "",
        "## Intended use",
        "",
        INTENDED_USE,
        "",
        "## Training data",
        "",
        "| dataset | weight | tag | sources | fingerprint | input records | kept | dropped (by reason) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for data in card["data"]:
        sources = ", ".join(f"{s['name']} ({s['format']}, {s['files']} files)" for s in data.get("sources", []))
        dropped = ", ".join(f"{reason} {figure(n)}" for reason, n in (data.get("dropped") or {}).items()) or "none"
        lines.append(
            f"| `{data['path']}` | {figure(data['weight'])} | {data['tag'] or '—'} | {sources or '—'} | "
            f"`{data.get('fingerprint')}` | {figure(data.get('input_records'))} | {figure(data.get('kept'))} | "
            f"{dropped} |"
        )
    lines += ["", "## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {figure(value)} |" for key, value in card["training"].items()]
    if card["lora"]:
        lines += [f"| lora.{key} | {figure(value)} |" for key, value in card["lora"].items()]
    lines += ["", "Final metrics:", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {figure(value)} |" for key, value in card["final_metrics"].items()]
    lines += ["", "## Evaluation", ""]
    evaluation = card.get("evaluation")
    if not evaluation:
        lines += ["Not evaluated yet: `chatforge eval` adds its results here.", ""]
    else:
        baseline = evaluation["baseline"]
        lines += [
            f"From `{evaluation['eval_json']}` ({evaluation['created_at']}).",
            "",
            "| metric | this model | baseline |",
            "| --- | --- | --- |",
        ]
        for key in EVAL_KEYS:
            lines.append(f"| {key} | {figure(evaluation[key])} | {figure(baseline[key]) if baseline else '—'} |")
        gate = evaluation["gate"]
        if gate:
            verdict = "passed" if gate["passed"] else "failed: " + "; ".join(gate["reasons"])
            lines += ["", f"Gate against `{baseline['model_dir']}`: **{verdict}**."]
        lines += [
            "",
            "### Bias",
            "",
            f"{figure(evaluation['bias_probes'])} templated probes. The largest gap between groups of one axis, per "
            "metric:",
            "",
            "| metric | largest gap | axis |",
            "| --- | --- | --- |",
        ]
        for metric, value in evaluation["bias_max_gap"].items():
            lines.append(f"| {metric} | {figure(value)} | {evaluation['bias_max_gap_axis'].get(metric) or '—'} |")
        lines.append("")
    lines += ["## Limitations", "", *(f"- {item}" for item in LIMITATIONS), ""]
    return "\n".join(lines)


def write_card(model_dir: str, card: dict[str, Any]) -> None:
    write_atomic(os.path.join(model_dir, CARD_DATA), json.dumps(card, indent=2) + "\n")
    write_atomic(os.path.join(model_dir, CARD), render_card(card))


def add_evaluation(model_dir: str, result: dict[str, Any], eval_json: str) -> bool:
    """Add an evaluation to the card of ``model_dir``; False when the dir has no chatforge card (a model chatforge
    did not train)."""
    path = os.path.join(model_dir, CARD_DATA)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        card = json.load(f)
    card["evaluation"] = evaluation_card(result, eval_json)
    write_card(model_dir, card)
    return True
