"""Where a model came from: data -> curation -> training -> model -> evaluations, answered from the files the
commands wrote and again from MLflow's runs, with the places where the two answers disagree.

The files answer follows paths: the model's training.json names its data, each data dir's manifest.json its
curation, each eval.json the model it measured. The MLflow answer follows the tags `chatforge.tracking` puts on
every run: the train run whose output is the model's training output, the curate runs whose output fingerprint is
the training data's, the eval runs of the model dir. Each command also writes its run id into its own file, so the
two answers name the same runs unless a file was overwritten or copied, or a command ran with tracking off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.tracking import COMMAND_TAG, FINGERPRINT_TAG, OUTPUT_TAG

MODEL_DIR_TAG = "chatforge.model_dir"
CONTEXT_TAG = "mlflow.data.context"  # an MLflow dataset input's context: "source" for curate, "training.NAME" for train


class LineageError(ValueError):
    """A model dir or eval dir whose files are missing; the message names the path."""


@dataclass
class Link:
    """One step of the chain; ``kind`` is data, curation, training, model or eval."""

    kind: str
    label: str
    run_id: str | None
    path: str | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lineage:
    model_dir: str
    links: list[Link]  # from the files
    mlflow_links: list[Link] | None  # None when there is no MLflow answer; ``mlflow_note`` says why
    disagreements: list[str]
    mlflow_note: str | None = None


def lineage_of(model_dir: str, eval_dirs: Sequence[str] = ()) -> Lineage:
    """The lineage of an exported model dir (a training output's model/), with the given eval output dirs."""
    model = str(Path(model_dir).resolve())  # as `chatforge eval` tags it
    output = os.path.dirname(os.path.abspath(model_dir))  # as `chatforge train` tags its output
    training_json = os.path.join(output, "training.json")
    if not os.path.isfile(training_json):
        raise LineageError(
            f"{model_dir} is not a chatforge training output: no training.json beside it ({training_json})"
        )
    training = read_json(training_json)
    links, disagreements = file_links(model, output, training, eval_dirs)
    tracking = training.get("tracking")
    if not tracking:
        return Lineage(model, links, None, disagreements, "training.json names no MLflow run (tracking was off)")
    from mlflow.exceptions import MlflowException

    try:
        tracked = mlflow_links(tracking["uri"], model, output)
    except (MlflowException, OSError) as err:  # the files' answer stands alone
        return Lineage(model, links, None, disagreements, f"MLflow store {tracking['uri']} cannot be reached: {err}")
    return Lineage(model, links, tracked, disagreements + compare(links, tracked, output, model))


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:
        raise LineageError(f"{path}: not valid JSON ({err}); was it written by chatforge?") from err


def manifest_path(data_path: str) -> str:
    """The manifest.json of a training data path: a curation output's data/ dir, or the curation output itself
    (the rule of `chatforge.train.data.resolve_data_dir`, which imports torch and needs the data still there)."""
    directory = os.path.abspath(os.path.expanduser(data_path))
    return os.path.join(
        os.path.dirname(directory) if os.path.basename(directory) == "data" else directory, "manifest.json"
    )


def run_id(written: dict) -> str | None:
    return (written.get("tracking") or {}).get("run_id")


def file_links(model: str, output: str, training: dict, eval_dirs: Sequence[str]) -> tuple[list[Link], list[str]]:
    links: list[Link] = []
    disagreements: list[str] = []
    config = training["config"]
    recorded = training.get("data_fingerprints") or []
    for number, source in enumerate(config["train"]["data"]):
        manifest_file = manifest_path(source["path"])
        if not os.path.isfile(manifest_file):
            links.append(Link("data", "uncurated data (no manifest.json)", None, source["path"]))
            continue
        manifest = read_json(manifest_file)
        for read in manifest["sources"]:
            where = os.path.commonpath(read["files"]) if read["files"] else None
            links.append(
                Link("data", read["name"], None, where, {"format": read["format"], "files": len(read["files"])})
            )
        curation = os.path.dirname(manifest_file)
        figures = {key: manifest.get(key) for key in ("input_records", "kept", "fingerprint")}
        links.append(Link("curation", curation, run_id(manifest), curation, figures))
        if number < len(recorded) and recorded[number] != manifest.get("fingerprint"):
            disagreements.append(
                f"data: {manifest_file} has fingerprint {manifest.get('fingerprint')}, training.json recorded "
                f"{recorded[number]}: the data was curated again after training"
            )
    links.append(Link("training", output, run_id(training), output, {"fingerprint": training.get("fingerprint")}))
    final = training.get("final_metrics") or {}
    model_figures = {"base": config["model"]["name_or_path"], "method": config.get("method")}
    links.append(Link("model", model, None, model, model_figures | {k: final.get(k) for k in ("eval_loss", "step")}))
    for eval_dir in eval_dirs:
        eval_json = os.path.join(eval_dir, "eval.json")
        if not os.path.isfile(eval_json):
            raise LineageError(f"--eval {eval_dir}: no eval.json there; pass a `chatforge eval` output dir")
        result = read_json(eval_json)
        gate = result.get("gate")
        figures = {key: result.get(key) for key in ("perplexity", "toxicity_rate")}
        figures["gate"] = None if gate is None else ("PASS" if gate["passed"] else "FAIL")
        links.append(Link("eval", eval_dir, run_id(result), os.path.abspath(eval_dir), figures))
        if str(Path(result["model_dir"]).resolve()) != model:
            disagreements.append(f"eval {eval_dir}: eval.json measured {result['model_dir']}, not {model}")
    links += deployment_links(output)
    return links, disagreements


def deployment_links(output: str) -> list[Link]:
    """Where a continual cycle's candidate went: the canary deployment (and its promotion or rollback by a later
    cycle) that the cycle.json beside its training output records."""
    cycle_json = os.path.join(os.path.dirname(output), "cycle.json")
    if not os.path.isfile(cycle_json):
        return []
    record = read_json(cycle_json)
    deployment = record.get("deployment")
    if not deployment:
        gate = (record.get("eval") or {}).get("gate") or {}
        reason = "the gate failed" if gate and not gate.get("passed") else "no canary deployment configured"
        return [Link("deployment", f"not deployed ({reason})", None, None, {"cycle": record.get("cycle")})]
    if deployment.get("error"):
        label = f"canary {deployment['canary']} failed to deploy: {deployment['error']}"
        return [Link("deployment", label, None, None, {"cycle": record.get("cycle")})]
    figures = {"cycle": record.get("cycle"), "weights": deployment.get("weights")}
    links = [Link("deployment", f"canary {deployment['canary']} on {deployment['app']}", None, None, figures)]
    for later in sorted(Path(output).parent.parent.glob("cycle-*/cycle.json")):  # the loop output's other cycles
        decision = read_json(str(later)).get("canary") or {}
        if decision.get("canary") == deployment["canary"] and decision.get("action") in ("promote", "rollback"):
            figures = {"cycle": read_json(str(later)).get("cycle"), "reason": decision.get("reason")}
            links.append(Link("deployment", f"{decision['action']}d: {decision['canary']}", None, None, figures))
    return links


def mlflow_links(uri: str, model: str, output: str) -> list[Link]:
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not os.path.isfile(uri.removeprefix("sqlite:///")):
        raise FileNotFoundError(f"no SQLite file at {uri.removeprefix('sqlite:///')}")  # MLflow would create one
    client = MlflowClient(uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]

    def runs(tags: dict[str, str], finished: bool = True) -> list:
        where = " and ".join([f"tags.`{key}` = '{value}'" for key, value in tags.items()])
        where += " and attributes.status = 'FINISHED'" if finished else ""
        return client.search_runs(experiments, where, order_by=["attributes.start_time DESC"])

    links: list[Link] = []
    train = next(iter(runs({COMMAND_TAG: "train", OUTPUT_TAG: output})), None)
    for fingerprint in training_fingerprints(train) if train else []:
        curate = next(iter(runs({COMMAND_TAG: "curate", f"{FINGERPRINT_TAG}.output": fingerprint})), None)
        if curate is None:
            links.append(
                Link("curation", f"no curate run wrote {fingerprint}", None, None, {"fingerprint": fingerprint})
            )
            continue
        for read in [read for read in curate.inputs.dataset_inputs if context(read) == "source"]:
            source = json.loads(read.dataset.source).get("uri")
            links.append(Link("data", read.dataset.name, None, source))
        curation = curate.data.tags.get(OUTPUT_TAG)
        figures = {key: curate.data.metrics.get(key) for key in ("input_records", "kept")}
        links.append(Link("curation", curation, curate.info.run_id, curation, figures | {"fingerprint": fingerprint}))
    if train is None:
        links.append(Link("training", f"no FINISHED train run for {output}", None, None))
    else:
        fingerprint = train.data.tags.get(f"{FINGERPRINT_TAG}.training")
        links.append(Link("training", output, train.info.run_id, output, {"fingerprint": fingerprint}))
    params, metrics = (train.data.params, train.data.metrics) if train else ({}, {})
    model_figures = {"base": params.get("model.name_or_path"), "method": params.get("method")}
    final = {key: metrics.get(f"final.{key}") for key in ("eval_loss", "step")}
    links.append(Link("model", model, None, model, model_figures | final))
    for evaluation in runs({COMMAND_TAG: "eval", MODEL_DIR_TAG: model}, finished=False):
        figures = {key: evaluation.data.metrics.get(key) for key in ("perplexity", "toxicity_rate")}
        found = client.search_model_versions(f"run_id='{evaluation.info.run_id}'")
        versions = [client.get_model_version(v.name, v.version) for v in found]  # a search leaves aliases out
        figures["registered"] = [f"{v.name} v{v.version}" + "".join(f" @{a}" for a in v.aliases) for v in versions]
        figures["status"] = None if evaluation.info.status == "FINISHED" else evaluation.info.status
        where = evaluation.data.tags.get(OUTPUT_TAG)
        links.append(Link("eval", where or evaluation.info.run_name, evaluation.info.run_id, where, figures))
    return links


def training_fingerprints(train) -> list[str]:
    """Each training dataset's fingerprint: the digests of the run's training inputs, else its fingerprint tag
    (one dataset's fingerprint is the training fingerprint; several are hashed together into it)."""
    digests = [
        read.dataset.digest
        for read in train.inputs.dataset_inputs
        if context(read).startswith("training") and read.dataset.digest != "unknown"
    ]
    tag = train.data.tags.get(f"{FINGERPRINT_TAG}.training")
    return digests or ([tag] if tag else [])


def context(read) -> str:
    return next((tag.value for tag in read.tags if tag.key == CONTEXT_TAG), "")


def compare(files: list[Link], tracked: list[Link], output: str, model: str) -> list[str]:
    """Where the two answers name different runs: the training run, each dataset's curation run (matched by
    fingerprint), and each given evaluation (MLflow may know more evaluations than were given; that is fine)."""
    found = []
    [ours] = [link.run_id for link in files if link.kind == "training"]
    [theirs] = [link.run_id for link in tracked if link.kind == "training"]
    if ours != theirs:
        found.append(
            f"training run: training.json names {ours}, MLflow's newest train run for {output} is {theirs or 'none'}"
        )
    curate_runs = {link.details.get("fingerprint"): link.run_id for link in tracked if link.kind == "curation"}
    for link in files:
        fingerprint = link.details.get("fingerprint")
        if link.kind == "curation" and fingerprint in curate_runs and curate_runs[fingerprint] != link.run_id:
            found.append(
                f"curation run: {link.path}/manifest.json names {link.run_id or 'none'}, MLflow's newest curate run "
                f"that wrote {fingerprint} is {curate_runs[fingerprint] or 'none'}"
            )
    eval_runs = {link.run_id for link in tracked if link.kind == "eval"}
    for link in files:
        if link.kind == "eval" and link.run_id and link.run_id not in eval_runs:
            found.append(
                f"eval run: {link.path}/eval.json names {link.run_id}, MLflow has no eval run of {model} by that id"
            )
    return found
