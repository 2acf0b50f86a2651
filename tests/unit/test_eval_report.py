"""report.html from a fixed result: self-contained, every model text escaped, each section present."""

from __future__ import annotations

import base64
import copy
import re
from html.parser import HTMLParser

from chatforge.eval.report import render_report

EVIL = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def bias_block(gap: float) -> dict:
    return {
        "threshold": 0.8,
        "metrics": ["toxicity_rate", "refusal_rate"],
        "probes": 4,
        "errors": 0,
        "axes": {
            "religion": {
                "groups": {
                    "muslim": {"n": 2, "toxicity_rate": gap, "refusal_rate": 0.0, "mean_toxicity": 0.4},
                    f"christian{EVIL}": {"n": 2, "toxicity_rate": 0.0, "refusal_rate": 0.0, "mean_toxicity": 0.1},
                },
                "gap": {
                    "toxicity_rate": {"value": gap, "highest": "muslim", "lowest": f"christian{EVIL}"},
                    "refusal_rate": {"value": 0.0, "highest": None, "lowest": None},
                },
            }
        },
        "max_gap": {"toxicity_rate": gap, "refusal_rate": 0.0},
        "max_gap_axis": {"toxicity_rate": "religion", "refusal_rate": "religion"},
    }


def toxicity_block(scores: list[float]) -> dict:
    return {
        "threshold": 0.8,
        "generations": len(scores),
        "answered": len(scores),
        "errors": 0,
        "toxic": sum(s >= 0.8 for s in scores),
        "toxicity_rate": sum(s >= 0.8 for s in scores) / len(scores),
        "refusal_rate": 0.0,
        "mean_toxicity": sum(scores) / len(scores),
        "by_category": {"hostile_user": {"n": len(scores), "toxicity_rate": 0.25, "refusal_rate": 0.0}},
        "scores": scores,
    }


RESULT = {
    "schema": "chatforge.eval/1",
    "created_at": "2026-12-04T12:00:00+00:00",
    "wall_seconds": 12.5,
    "model_dir": "/runs/train/model",
    "data_dir": "/runs/curated/data",
    "split": "test",
    "perplexity": 33.0,
    "toxicity_rate": 0.25,
    "refusal_rate": 0.0,
    "toxicity": toxicity_block([0.01, 0.2, 0.5, 0.95]),
    "bias": bias_block(0.5),
    "most_toxic": [{"id": "rude-1", "prompt": f"Say {EVIL}", "text": f"you {EVIL}", "toxicity": 0.95}],
    "samples": [
        {
            "id": "hostile-1",
            "category": "hostile_user",
            "messages": [{"role": "user", "content": f"Hi {EVIL}"}],
            "text": "Hello there",
            "finish_reason": "stop",
            "toxicity": 0.01,
            "refused": False,
            "prompt_tokens": ["<|im_start|>", "user\n", "Hi", " <script>"],
            "tokens": [
                {"token": "Hello", "logprob": -0.1, "top": [["Hello", -0.1], ["<b>Hi</b>", -2.5]]},
                {"token": " there", "logprob": -1.2, "top": [[" there", -1.2]]},
                {"token": "<|im_end|>", "logprob": -0.05, "top": []},
            ],
            "attributed_tokens": 2,
            "attribution": [[0.1, 0.2, 0.6, 0.1], [0.0, 0.0, 0.5, 0.5]],
            "prompt_share": [0.9, 0.7],
        },
        {
            "id": "long-1",
            "category": "everyday",
            "messages": [{"role": "user", "content": "x"}],
            "error": "PromptTooLong",
        },
    ],
    "baseline": {
        "model_dir": "/models/base",
        "perplexity": 53.2,
        "toxicity_rate": 0.0,
        "refusal_rate": 0.0,
        "toxicity": toxicity_block([0.01, 0.02, 0.03, 0.1]),
        "bias": bias_block(0.0),
    },
    "gate": {
        "passed": False,
        "reasons": ["toxicity rate 0.250 vs the baseline's 0.000"],
        "checks": [
            {"name": "perplexity", "passed": True, "message": "perplexity 33.000 is 38.0% below the baseline's 53.200"},
            {"name": "toxicity_rate", "passed": False, "message": "toxicity rate 0.250 vs the baseline's 0.000"},
        ],
    },
    "training": {
        "path": "/runs/train/metrics.jsonl",
        "rows": [{"step": 5, "loss": 3.9}, {"step": 10, "loss": 3.5, "eval_loss": 3.2}],
    },
}


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def parse(page: str) -> Collector:
    collector = Collector()
    collector.feed(page)
    return collector


def test_model_text_is_escaped_everywhere():
    page = render_report(RESULT)
    assert "alert(" in page  # the text is shown...
    assert '<script>alert("pwned")' not in page and "<img src=x" not in page  # ...but never as markup
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    parsed = parse(page)
    assert [tag for tag, _ in parsed.tags].count("script") == 1  # only the report's own
    assert all("alert" not in script for script in parsed.scripts)
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)  # no injected handlers


def test_self_contained_with_inline_png_plots():
    page = render_report(RESULT)
    parsed = parse(page)
    images = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 2  # loss curves and toxicity histogram
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    assert not any(tag == "link" for tag, _ in parsed.tags)


def test_gate_verdict_and_reasons():
    page = render_report(RESULT)
    assert "Gate: FAIL" in page and "toxicity rate 0.250 vs the baseline&#x27;s 0.000" in page
    passing = copy.deepcopy(RESULT)
    passing["gate"] = {"passed": True, "reasons": [], "checks": []}
    assert "Gate: PASS" in render_report(passing)
    passing["gate"] = None
    assert "No baseline given: no gate." in render_report(passing)


def test_bias_table_and_summary_show_model_and_baseline():
    page = render_report(RESULT)
    assert "muslim" in page and "50.0%" in page and "<b>50.0%</b>" in page  # the group's rate and the axis gap
    assert "33.000" in page and "53.200" in page  # perplexity: model and baseline


def test_sample_tokens_carry_logprob_tooltips_and_attribution_shading():
    parsed = parse(render_report(RESULT))
    spans = [attrs for tag, attrs in parsed.tags if tag == "span"]
    answer = [s for s in spans if "title" in s and "logprob" in s["title"]]
    assert len(answer) == 3
    assert "'Hello': logprob -0.100 (p=0.905)" in answer[0]["title"] and "'<b>Hi</b>': -2.500" in answer[0]["title"]
    assert answer[0]["data-a"] == "0.1000,0.2000,0.6000,0.1000" and "data-a" not in answer[2]  # beyond attributed
    shaded = [s["style"] for s in spans if s.get("style", "").startswith("background: rgba(234, 88, 12")]
    alphas = [float(re.search(r", ([0-9.]+)\)$", style).group(1)) for style in shaded]
    assert len(alphas) == 4 and max(alphas) == 0.85 and alphas.index(max(alphas)) == 2  # the most attributed token


def test_without_training_metrics_or_baseline():
    bare = copy.deepcopy(RESULT)
    bare.update(training=None, baseline=None, gate=None, samples=[])
    page = render_report(bare)
    assert "no loss curves" in page and "No samples." in page
    assert len([tag for tag, _ in parse(page).tags if tag == "img"]) == 1
