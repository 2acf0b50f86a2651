"""`report.html`: one self-contained page (inline CSS, plots as inline PNG, a few lines of inline JS) rendered from
the evaluation result alone, so the same eval.json always renders the same page.

Every piece of model or user text goes through `html.escape`: answers are untrusted input to a browser.
"""

from __future__ import annotations

import base64
import html
import io
import math

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #1d2433; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 2px solid #e3e7ef; }
.meta { color: #5b6475; font-size: 12px; } .meta code { background: #f2f4f8; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 8px 0 16px; } th, td { padding: 4px 10px; border: 1px solid #dde2ea; }
th { background: #f2f4f8; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: 14px 18px; border-radius: 8px; font-size: 18px; font-weight: 600; margin: 16px 0; }
.pass { background: #e3f6e8; color: #17692f; border: 1px solid #9bd5ab; }
.fail { background: #fde8e8; color: #9b1c1c; border: 1px solid #f0a8a8; }
.none { background: #f2f4f8; color: #5b6475; border: 1px solid #dde2ea; }
.ok { color: #17692f; } .bad { color: #9b1c1c; font-weight: 600; }
.sample { border: 1px solid #dde2ea; border-radius: 8px; padding: 10px 14px; margin: 12px 0; }
.tokens { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; word-break: break-word; }
.tokens span { border-radius: 2px; } .gen span { cursor: pointer; border-bottom: 3px solid transparent; }
.gen span { box-shadow: inset -1px 0 #d5dbe5; } .gen span.active { outline: 2px solid #1d4ed8; } .label { font-weight: 600; color: #5b6475; margin-top: 6px; }
.muted { color: #8a93a5; } img { max-width: 100%; } .answer { white-space: pre-wrap; }
"""

SCRIPT = """
document.querySelectorAll('.sample').forEach(function (sample) {
  var prompt = sample.querySelectorAll('.prompt span');
  function shade(values) {
    var top = Math.max.apply(null, values.concat([1e-9]));
    prompt.forEach(function (span, i) {
      span.style.background = 'rgba(234, 88, 12, ' + ((values[i] || 0) / top * 0.85).toFixed(3) + ')';
    });
  }
  sample.querySelectorAll('.gen span[data-a]').forEach(function (span) {
    span.addEventListener('mouseenter', function () {
      sample.querySelectorAll('.gen span.active').forEach(function (s) { s.classList.remove('active'); });
      span.classList.add('active');
      shade(span.dataset.a.split(',').map(Number));
    });
  });
});
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<span class="muted">n/a</span>'
    return f"{value:.{max(digits - 2, 0)}%}" if percent else f"{value:.{digits}f}"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def loss_plot(training: dict) -> str:
    """Training loss and eval loss against step, from metrics.jsonl rows."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.2))
    axes = figure.subplots()
    train = [(row["step"], row["loss"]) for row in training["rows"] if "loss" in row]
    evals = [(row["step"], row["eval_loss"]) for row in training["rows"] if "eval_loss" in row]
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", color="#2563eb")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#ea580c")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)


def toxicity_plot(model_scores: list[float], baseline_scores: list[float] | None, threshold: float) -> str:
    """Histogram of the answers' toxicity scores (log count), the candidate's beside the baseline's."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.2))
    axes = figure.subplots()
    bins = [i / 20 for i in range(21)]
    series = [(model_scores, "model", "#2563eb")]
    if baseline_scores is not None:
        series.append((baseline_scores, "baseline", "#9ca3af"))
    axes.hist([s for s, _, _ in series], bins=bins, label=[n for _, n, _ in series], color=[c for _, _, c in series])
    axes.axvline(threshold, color="#dc2626", linestyle="--", label=f"threshold {threshold:g}")
    axes.set_yscale("log")
    axes.set_xlabel("toxicity score of the answer")
    axes.set_ylabel("answers")
    axes.legend()
    return _png(figure)


def _gate(gate: dict | None) -> str:
    if gate is None:
        return '<div class="verdict none">No baseline given: no gate.</div>'
    verdict = "PASS" if gate["passed"] else "FAIL"
    rows = "".join(
        f'<tr><td>{_e(c["name"])}</td><td class="{"ok" if c["passed"] else "bad"}">{"pass" if c["passed"] else "FAIL"}'
        f"</td><td>{_e(c['message'])}</td></tr>"
        for c in gate["checks"]
    )
    return (
        f'<div class="verdict {"pass" if gate["passed"] else "fail"}">Gate: {verdict}</div>'
        f"<table><tr><th>check</th><th>result</th><th>why</th></tr>{rows}</table>"
    )


def _summary(result: dict) -> str:
    baseline = result.get("baseline") or {}

    def line(label: str, key, digits=3, percent=False) -> str:
        get = key if callable(key) else (lambda r: r.get(key))
        base = _num(get(baseline), digits, percent) if baseline else ""
        return f'<tr><td>{label}</td><td class="num">{_num(get(result), digits, percent)}</td><td class="num">{base}</td></tr>'

    def gap(metric):
        return lambda r: ((r.get("bias") or {}).get("max_gap") or {}).get(metric)

    return (
        "<table><tr><th>metric</th><th>model</th><th>baseline</th></tr>"
        + line("perplexity (test, assistant tokens)", "perplexity")
        + line("toxicity rate", "toxicity_rate", 3, True)
        + line("refusal rate (prompt set)", "refusal_rate", 3, True)
        + line("bias max gap: toxicity rate", gap("toxicity_rate"), 3, True)
        + line("bias max gap: refusal rate", gap("refusal_rate"), 3, True)
        + "</table>"
    )


def _toxicity(result: dict) -> str:
    detail = result["toxicity"]
    baseline = (result.get("baseline") or {}).get("toxicity")
    parts = [
        toxicity_plot(detail["scores"], baseline["scores"] if baseline else None, detail["threshold"]),
        f'<p class="meta">{detail["answered"]} answers scored ({detail["errors"]} prompts without an answer), '
        f"{detail['toxic']} at or over the threshold {detail['threshold']:g}.</p>",
        "<table><tr><th>category</th><th>answers</th><th>toxicity rate</th><th>refusal rate</th></tr>",
    ]
    for category, stats in detail["by_category"].items():
        parts.append(
            f'<tr><td>{_e(category)}</td><td class="num">{stats["n"]}</td>'
            f'<td class="num">{_num(stats["toxicity_rate"], 3, True)}</td>'
            f'<td class="num">{_num(stats["refusal_rate"], 3, True)}</td></tr>'
        )
    parts.append("</table>")
    worst = result.get("most_toxic") or []
    if worst:
        parts.append("<h3>Most toxic answers</h3><table><tr><th>score</th><th>prompt</th><th>answer</th></tr>")
        for row in worst:
            parts.append(
                f'<tr><td class="num">{_num(row["toxicity"])}</td><td>{_e(row["prompt"])}</td>'
                f'<td class="answer">{_e(row["text"])}</td></tr>'
            )
        parts.append("</table>")
    return "".join(parts)


def _bias(bias: dict | None) -> str:
    if not bias or not bias.get("axes"):
        return '<p class="muted">No bias probes were answered.</p>'

    def worst(metric: str) -> str:
        axis = bias["max_gap_axis"].get(metric)
        return _num(bias["max_gap"][metric], 3, True) + (f" ({_e(axis)})" if axis else "")

    parts = [
        f'<p class="meta">{bias["probes"]} probes; max gap: toxicity rate {worst("toxicity_rate")}, refusal rate '
        f"{worst('refusal_rate')}.</p>",
        "<table><tr><th>axis</th><th>group</th><th>probes</th><th>toxicity rate</th><th>refusal rate</th>"
        "<th>mean toxicity</th></tr>",
    ]
    for axis, table in bias["axes"].items():
        groups = table["groups"]
        for i, (group, stats) in enumerate(groups.items()):
            head = f'<td rowspan="{len(groups) + 1}">{_e(axis)}</td>' if i == 0 else ""
            cells = "".join(
                f'<td class="num" style="background: rgba(220, 38, 38, {min((stats[m] or 0) * 0.8, 0.8):.2f})">'
                f"{_num(stats[m], 3, True)}</td>"
                for m in ("toxicity_rate", "refusal_rate")
            )
            parts.append(
                f'<tr>{head}<td>{_e(group)}</td><td class="num">{stats["n"]}</td>{cells}'
                f'<td class="num">{_num(stats["mean_toxicity"])}</td></tr>'
            )
        gaps = table["gap"]
        parts.append(
            f'<tr><td><b>gap</b></td><td></td><td class="num"><b>{_num(gaps["toxicity_rate"]["value"], 3, True)}</b></td>'
            f'<td class="num"><b>{_num(gaps["refusal_rate"]["value"], 3, True)}</b></td><td></td></tr>'
        )
    parts.append("</table>")
    return "".join(parts)


def _token_text(token: str) -> str:
    return _e(token.replace("\n", "\u21b5\n"))


def _sample(sample: dict) -> str:
    prompt = _e(sample["messages"][-1]["content"])
    head = (
        f'<div class="sample"><div><b>{_e(sample["id"])}</b> <span class="muted">({_e(sample["category"])})</span>'
        f"</div><div>{prompt}</div>"
    )
    if sample.get("error"):
        return f'{head}<p class="bad">{_e(sample["error"])}</p></div>'
    attribution = sample["attribution"]
    columns = list(zip(*attribution, strict=True)) if attribution else []
    mean = [sum(col) / len(col) for col in columns] if columns else [0.0] * len(sample["prompt_tokens"])
    top = max(mean + [1e-9])
    prompt_spans = "".join(
        f'<span style="background: rgba(234, 88, 12, {value / top * 0.85:.3f})">{_token_text(token)}</span>'
        for token, value in zip(sample["prompt_tokens"], mean, strict=True)
    )
    generated = []
    for i, token in enumerate(sample["tokens"]):
        probability = math.exp(token["logprob"])
        tip = [f"{token['token']!r}: logprob {token['logprob']:.3f} (p={probability:.3f})"]
        tip += [f"  {alt!r}: {lp:.3f}" for alt, lp in token.get("top", [])]
        if i < len(attribution):
            tip.append(f"prompt share of attribution: {sample['prompt_share'][i]:.2f}")
        data = f' data-a="{",".join(f"{v:.4f}" for v in attribution[i])}"' if i < len(attribution) else ""
        border = f"rgba(37, 99, 235, {1 - probability:.3f})"
        generated.append(
            f'<span title="{_e(chr(10).join(tip))}" style="border-bottom-color: {border}"{data}>'
            f"{_token_text(token['token'])}</span>"
        )
    note = sample.get("attribution_error") or ""
    return (
        f'{head}<div class="label">prompt tokens (shading: attribution, mean over the answer; hover an answer token '
        f'for its own)</div><div class="tokens prompt">{prompt_spans}</div>'
        f'<div class="label">answer (underline: 1 - p; hover: logprob and top alternatives)</div>'
        f'<div class="tokens gen">{"".join(generated)}</div>'
        f'<div class="meta">toxicity {_num(sample.get("toxicity"))}, refused: {_e(sample.get("refused"))}, '
        f"finish: {_e(sample.get('finish_reason'))}, attributed tokens: {sample['attributed_tokens']}"
        f"{' — ' + _e(note) if note else ''}</div></div>"
    )


def render_report(result: dict) -> str:
    """The whole page for an eval.json result."""
    training = result.get("training")
    losses = (
        loss_plot(training)
        if training and training.get("rows")
        else '<p class="muted">No metrics.jsonl beside the model (or in its training output): no loss curves.</p>'
    )
    baseline = result.get("baseline") or {}
    meta = (
        f"model <code>{_e(result['model_dir'])}</code>"
        + (f" · baseline <code>{_e(baseline.get('model_dir'))}</code>" if baseline else "")
        + (f" · data <code>{_e(result['data_dir'])}</code> ({_e(result['split'])})" if result.get("data_dir") else "")
        + f" · {_e(result['created_at'])} · {result['wall_seconds']:.1f} s"
    )
    samples = "".join(_sample(s) for s in result.get("samples") or []) or '<p class="muted">No samples.</p>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>chatforge evaluation: {_e(result['model_dir'])}</title><style>{CSS}</style></head><body>"
        f'<h1>chatforge evaluation</h1><div class="meta">{meta}</div>'
        f"{_gate(result.get('gate'))}<h2>Summary</h2>{_summary(result)}"
        f"<h2>Training loss</h2>{losses}"
        f"<h2>Toxicity of answers to the prompt set</h2>{_toxicity(result)}"
        f"<h2>Bias probes</h2>{_bias(result.get('bias'))}"
        f"<h2>Sample answers, explained</h2>{samples}"
        f"<script>{SCRIPT}</script></body></html>"
    )
