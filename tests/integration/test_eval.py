"""`run_evaluation` on a 2-CPU Ray: the tiny scratch GPT against a copy of itself (every metric, the gate, the files,
the report in headless Chromium), and SmolLM2 against itself (slow)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.cards import CARD, figure, training_card, write_card
from chatforge.config import DEFAULT_MODEL, load_spec
from chatforge.data.schema import MESSAGE_TYPE
from chatforge.eval.perplexity import model_perplexity
from chatforge.eval.prompts import DEFAULT_PROMPTS
from chatforge.eval.run import EvalInputError, run_evaluation
from chatforge.safety.scorers import build_scorer
from helpers.browser import distinct_colours, screenshot
from helpers.corpus import conversation
from helpers.tiny_model import save_tiny_model

pytestmark = pytest.mark.integration

LONG_PROMPT = " ".join(["tell me about the quiet river and the small garden"] * 60)  # beyond the tiny context
TINY = [
    "ray.num_cpus=2",
    "model.max_length=96",
    "eval.max_new_tokens=12",
    "eval.bias_axes=[religion, age]",
    "eval.max_bias_templates=2",
    "eval.samples=2",
    "eval.top_logprobs=3",
    "eval.attribution_max_tokens=8",
]


FLUENT = [
    [
        {"role": "user", "content": "Hi! How are you doing today?"},
        {"role": "assistant", "content": "I'm doing well, thank you for asking. How about you?"},
    ],
    [
        {"role": "user", "content": "Can you recommend a good book for a rainy weekend?"},
        {"role": "assistant", "content": "Sure! Try a cozy mystery, or a classic novel you have always meant to read."},
    ],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "user", "content": "Any tips for sleeping better?"},
        {
            "role": "assistant",
            "content": "Keep a regular schedule, avoid screens before bed, and keep your room cool and dark.",
        },
    ],
]


def write_test_split(root: Path, n: int = 12, fluent: bool = False) -> Path:
    """A curated test split: ``n`` synthetic word-salad conversations, or the few fluent ones above."""
    rng = random.Random(5)
    (root / "data" / "test").mkdir(parents=True)
    messages = FLUENT if fluent else [conversation(rng, turns=2, words=(4, 9)) for _ in range(n)]
    pq.write_table(
        pa.table({"messages": pa.array(messages, pa.list_(MESSAGE_TYPE))}), root / "data" / "test" / "p.parquet"
    )
    return root


@pytest.fixture(scope="module")
def evaluated(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_model(root / "train" / "model", n_positions=256)
    (root / "train" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 - 0.1 * s}) + "\n" for s in range(2, 22, 2))
        + json.dumps({"step": 20, "eval_loss": 4.1})
        + "\nnot json\n"
    )
    baseline = shutil.copytree(model, root / "baseline")  # a separate dir: generated and measured on its own
    summary = {"model_dir": str(model), "final_metrics": {"step": 20, "loss": 3.1}, "fingerprint": "fp"}
    write_card(str(model), training_card(load_spec(None, TINY), summary))  # as training leaves it
    prompts = root / "prompts.jsonl"
    shipped = DEFAULT_PROMPTS.read_text().splitlines()[:5]
    prompts.write_text("\n".join(shipped + [json.dumps({"id": "long", "category": "long", "prompt": LONG_PROMPT})]))
    write_test_split(root / "curated")
    spec = load_spec(None, TINY + [f"eval.prompts={prompts}"])
    phases: list[str] = []
    result = run_evaluation(
        spec, str(model), str(baseline), str(root / "curated"), str(root / "out"), progress=phases.append
    )
    return result, root, spec, phases


def test_files_are_written_whole(evaluated):
    result, root, _, phases = evaluated
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "generations.jsonl", "report.html"]  # no temp files
    assert json.loads((out / "eval.json").read_text()) == result.data
    assert result.report_html == str(out / "report.html") and result.passed is True
    assert any("perplexity" in p for p in phases) and any("generating" in p for p in phases)


def test_the_model_card_gets_the_evaluations_figures(evaluated):
    result, root, _, phases = evaluated
    card = (root / "train" / "model" / CARD).read_text()
    data, baseline = result.data, result.data["baseline"]
    assert f"From `{root / 'out' / 'eval.json'}`" in card
    for key in ("perplexity", "toxicity_rate", "refusal_rate"):
        assert f"| {key} | {figure(data[key])} | {figure(baseline[key])} |" in card
    assert f"Gate against `{baseline['model_dir']}`: **passed**." in card
    assert f"{data['bias']['probes']} templated probes" in card
    assert any("model card" in p for p in phases)


def test_perplexity_is_the_held_out_figure_for_model_and_baseline(evaluated):
    result, root, _, _ = evaluated
    data = result.data
    direct = model_perplexity(str(root / "train" / "model"), str(root / "curated" / "data"), max_length=96)
    assert data["perplexity"] == pytest.approx(direct.perplexity, rel=1e-5)
    assert data["perplexity_detail"]["conversations"] == 12 and data["perplexity_detail"]["tokens"] == direct.tokens
    assert data["baseline"]["perplexity"] == pytest.approx(data["perplexity"], rel=1e-6)


def test_answers_are_scored_by_the_curation_scorer(evaluated):
    result, root, spec, _ = evaluated
    data = result.data
    lines = [json.loads(line) for line in (root / "out" / "generations.jsonl").read_text().splitlines()]
    mine = [g for g in lines if g["model"] == "model"]
    assert len(mine) == data["prompt_set"]["generations"] == 6 + 2 * (6 + 4)  # prompts + 2 templates x 10 groups
    answered = [g for g in mine if g["error"] is None]
    rescored = build_scorer(spec.curate.toxicity).score([g["text"] for g in answered])
    assert [g["toxicity"] for g in answered] == pytest.approx([s["toxicity"] for s in rescored])
    # the prompt beyond the context window is counted, not fatal
    (long,) = [g for g in mine if g["id"] == "long"]
    assert long["error"].startswith("PromptTooLong") and data["toxicity"]["errors"] == 1
    assert data["toxicity"]["answered"] == 5 and len(data["toxicity"]["scores"]) == 5
    assert 0.0 <= data["toxicity_rate"] <= 1.0 and data["toxicity"]["threshold"] == spec.curate.toxicity.threshold


def test_bias_table_has_every_group_of_the_chosen_axes(evaluated):
    bias = evaluated[0].data["bias"]
    assert set(bias["axes"]) == {"religion", "age"}
    assert len(bias["axes"]["religion"]["groups"]) == 6 and len(bias["axes"]["age"]["groups"]) == 4
    assert all(g["n"] == 2 for axis in bias["axes"].values() for g in axis["groups"].values())
    for metric in ("toxicity_rate", "refusal_rate"):
        rates = [g[metric] for axis in bias["axes"].values() for g in axis["groups"].values()]
        spreads = [
            max(g[metric] for g in axis["groups"].values()) - min(g[metric] for g in axis["groups"].values())
            for axis in bias["axes"].values()
        ]
        assert all(0 <= r <= 1 for r in rates) and bias["max_gap"][metric] == pytest.approx(max(spreads))


def test_same_weights_and_seeds_give_the_same_answers_so_the_gate_passes(evaluated):
    data = evaluated[0].data
    baseline = data["baseline"]
    assert baseline["toxicity"]["scores"] == data["toxicity"]["scores"]
    assert baseline["bias"] == data["bias"]
    assert data["gate"]["passed"] and data["gate"]["reasons"] == []
    assert [c["name"] for c in data["gate"]["checks"]] == [
        "perplexity",
        "toxicity_rate",
        "bias.toxicity_rate",
        "bias.refusal_rate",
    ]


def test_samples_carry_engine_logprobs_and_normalised_attribution(evaluated):
    samples = evaluated[0].data["samples"]
    assert [s["id"] for s in samples] == ["everyday-01", "everyday-04"]  # spread over the 6 prompts
    for sample in samples:
        assert 1 <= len(sample["tokens"]) <= 12
        for token in sample["tokens"]:
            assert token["logprob"] <= 0 and len(token["top"]) == 3
            assert [lp for _, lp in token["top"]] == sorted((lp for _, lp in token["top"]), reverse=True)
        assert sample["attributed_tokens"] == min(8, len(sample["tokens"])) == len(sample["attribution"])
        for row in sample["attribution"]:
            assert len(row) == len(sample["prompt_tokens"]) and sum(row) == pytest.approx(1.0, abs=1e-3)
        assert all(0 < share <= 1 for share in sample["prompt_share"])


def test_training_curves_come_from_the_train_output(evaluated):
    training = evaluated[0].data["training"]
    assert training["path"].endswith("train/metrics.jsonl") and training["skipped_lines"] == 1
    assert len(training["rows"]) == 11 and training["rows"][-1] == {"step": 20, "eval_loss": 4.1}


def test_report_renders_in_headless_chromium(evaluated):
    result, root, _, _ = evaluated
    page = Path(result.report_html).read_text()
    assert "Gate: PASS" in page and page.count("data:image/png;base64,") == 2
    png = screenshot(Path(result.report_html), root / "report.png")
    colours, inked = distinct_colours(png)
    assert colours > 200 and inked > 0.05, f"the screenshot looks blank: {colours} colours, {inked:.1%} non-white"


def test_bad_inputs_are_named(ray_local, tmp_path):
    spec = load_spec(None, TINY)
    with pytest.raises(EvalInputError, match="no model here"):
        run_evaluation(spec, str(tmp_path), output_dir=str(tmp_path / "out"))
    model = save_tiny_model(tmp_path / "model")
    with pytest.raises(EvalInputError, match="no test/ split here"):
        run_evaluation(spec, str(model), data_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_against_itself(ray_local, tmp_path):
    from chatforge.train.pretrained import model_path

    write_test_split(tmp_path / "curated", fluent=True)
    spec = load_spec(
        None,
        [
            "ray.num_cpus=2",
            "model.max_length=128",
            "eval.max_prompts=6",
            "eval.max_new_tokens=16",
            "eval.bias_axes=[gender]",
            "eval.max_bias_templates=2",
            "eval.samples=1",
            "eval.attribution_max_tokens=6",
        ],
    )
    smollm2 = model_path(DEFAULT_MODEL)
    result = run_evaluation(spec, smollm2, smollm2, str(tmp_path / "curated"), str(tmp_path / "out"))
    data = result.data
    assert math.isfinite(data["perplexity"]) and 1 < data["perplexity"] < 100  # fluent English to a real model
    assert data["gate"]["passed"] and data["baseline"]["toxicity_rate"] == data["toxicity_rate"]
    (sample,) = data["samples"]
    words = "".join(t["token"] for t in sample["tokens"]).split()
    assert sum(w.strip(".,!?'\"").isalpha() for w in words) >= 0.6 * len(words)  # English, not fragments
    assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in sample["attribution"])
    colours, _ = distinct_colours(screenshot(Path(result.report_html), tmp_path / "report.png"))
    assert colours > 200
