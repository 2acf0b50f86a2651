"""Model cards: every figure on the card is the run's own, from training.json, the manifests and eval.json."""

import json

import yaml

from chatforge.cards import CARD, CARD_DATA, add_evaluation, render_card, training_card, write_card
from chatforge.config import load_spec


def curated(tmp_path, name: str, kept: int, dropped: dict) -> str:
    out = tmp_path / name
    (out / "data").mkdir(parents=True)
    manifest = {
        "fingerprint": f"fp-{name}",
        "input_records": kept + sum(dropped.values()),
        "kept": kept,
        "dropped": dropped,
        "pii_replacements": {"email": 3},
        "sources": [{"name": "dump", "format": "sharegpt", "files": ["a.jsonl", "b.jsonl"]}],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out / "data")


def test_the_card_holds_the_runs_own_figures_and_evaluation_adds_its_part(tmp_path):
    support = curated(tmp_path, "support", 1234, {"duplicate:near": 56, "malformed:missing_messages": 7})
    chitchat = curated(tmp_path, "chitchat", 800, {})
    spec = load_spec(
        None,
        [f"train.data=[{{path: '{support}', weight: 2, tag: support}}, {{path: '{chitchat}'}}]", "method=lora",
         "train.max_steps=321", "train.lr=0.0002"],
    )  # fmt: skip
    model_dir = tmp_path / "run" / "model"
    model_dir.mkdir(parents=True)
    summary = {
        "model_dir": str(model_dir),
        "final_metrics": {"step": 321, "loss": 1.8765, "eval_loss": 2.0123, "tokens_per_s": 99.0},
        "fingerprint": "fp-combined",
        "chatforge_version": "0.9.0",
        "created_at": "2026-12-05T02:00:00+00:00",
    }
    write_card(str(model_dir), training_card(spec, summary))
    text = (model_dir / CARD).read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["base_model"] == spec.model.name_or_path and "lora" in metadata["tags"]
    assert f"| `{support}` | 2 | support | dump (sharegpt, 2 files) | `fp-support` | 1,297 | 1,234 | " \
           "duplicate:near 56, malformed:missing_messages 7 |" in text  # fmt: skip
    assert f"| `{chitchat}` | 1 | — | dump (sharegpt, 2 files) | `fp-chitchat` | 800 | 800 | none |" in text
    assert "| max_steps | 321 |" in text and "| lr | 0.0002 |" in text and "| loss | 1.877 |" in text
    assert "| eval_loss | 2.012 |" in text and "tokens_per_s" not in text
    assert "Not evaluated yet" in text and "fp-combined" in text

    result = {
        "perplexity": 12.3456,
        "toxicity_rate": 0.0625,
        "refusal_rate": 0.0,
        "baseline": {"model_dir": "/models/deployed", "perplexity": 13.5, "toxicity_rate": 0.0, "refusal_rate": 0.1},
        "gate": {"passed": False, "reasons": ["toxicity_rate 0.0625 is over the baseline's 0 + 0.05"]},
        "bias": {"probes": 96, "max_gap": {"toxicity_rate": 0.125, "refusal_rate": 0.0},
                 "max_gap_axis": {"toxicity_rate": "religion", "refusal_rate": None}},
        "prompt_set": {"prompts": 16},
        "created_at": "2026-12-05T03:00:00+00:00",
    }  # fmt: skip
    assert add_evaluation(str(model_dir), result, "/runs/eval/eval.json")
    text = (model_dir / CARD).read_text()
    assert "| perplexity | 12.35 | 13.5 |" in text and "| toxicity_rate | 0.0625 | 0 |" in text
    assert "Gate against `/models/deployed`: **failed: toxicity_rate 0.0625 is over the baseline's 0 + 0.05**." in text
    assert "96 templated probes" in text and "| toxicity_rate | 0.125 | religion |" in text
    assert "| refusal_rate | 0 | — |" in text
    assert json.loads((model_dir / CARD_DATA).read_text())["evaluation"]["eval_json"] == "/runs/eval/eval.json"
    assert not add_evaluation(str(tmp_path), result, "x")  # a dir without a chatforge card is left alone


def test_every_markdown_table_row_has_its_headers_columns(tmp_path):
    card = {"name": "m", "base_model": "scratch", "method": "full", "zero_stage": 2, "lora": None, "workers": 2,
            "training": {"max_steps": 1}, "final_metrics": {"loss": 1.0}, "fingerprint": None,
            "chatforge_version": "0", "created_at": "now", "evaluation": None,
            "data": [{"path": "d", "manifest": None, "weight": 1.0, "tag": None}]}  # fmt: skip
    table = None
    for line in render_card(card).splitlines():
        if line.startswith("|"):
            cells = line.count("|")
            table = table or cells
            assert cells == table, line
        else:
            table = None
