"""`chatforge curate`: conversation corpora to curated data with Ray Data, and the table that sums it up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chatforge.cli.common import console, fail, load_with_flags
from chatforge.config import ReadSpec, SourceSpec, SpecError

FORMAT_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "openai", ".ndjson": "openai", ".json": "sharegpt"}


def _inputs_as_sources(inputs: list[str], fmt: str | None, read: ReadSpec | None = None) -> list[SourceSpec]:
    from chatforge.data.sources import compression, file_suffix

    sources: list[SourceSpec] = []
    for number, path in enumerate(inputs, start=1):
        suffix = file_suffix(path)  # under any compression suffix: "a.jsonl.gz" -> ".jsonl"
        chosen = fmt or FORMAT_BY_SUFFIX.get(suffix)
        if chosen is None:
            fail(f"--input {path}: cannot tell its format from the name; pass --format sharegpt|openai|parquet")
        if fmt is None and chosen != "parquet":
            chosen = _sniffed(path, chosen, read or ReadSpec())
        base = Path(path).stem if compression(path) else Path(path).name  # "a.jsonl.gz" -> "a.jsonl"
        name = Path(base).stem or f"input{number}"
        if any(s.name == name for s in sources):
            name = f"{name}-{number}"
        try:
            sources.append(SourceSpec(name=name, format=chosen, path=path))
        except ValueError as err:
            fail(f"--input {path}: {err}")
    return sources


def _sniffed(path: str, by_name: str, read: ReadSpec) -> str:
    """The format of ``path``'s first records (ShareGPT's ``conversations`` or OpenAI's ``messages``), said on
    stderr; ``by_name`` (its suffix's) when they show neither or it is no single file."""
    from chatforge import storage
    from chatforge.data.sources import READ_ERRORS, first_records, sniff_format

    try:
        if not storage.isfile(path):
            return by_name
        seen = sniff_format(first_records(path, read))
    except READ_ERRORS:
        return by_name  # the read reports it
    if seen is None:
        return by_name
    console.print(f"--input {path}: read as {seen} (its first records hold that format's turns)", highlight=False)
    return seen


def curation_table(manifest: dict) -> Table:
    table = Table(title=f"curated {manifest['input_records']:,} records", show_lines=False)
    table.add_column("", style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("records", "input", f"{manifest['input_records']:,}")
    table.add_row("", "kept", f"{manifest['kept']:,}")
    for reason, n in manifest["dropped"].items():
        table.add_row("dropped", reason, f"{n:,}")
    for repair, n in manifest.get("repaired", {}).items():
        if n:
            table.add_row("repaired", repair, f"{n:,}")
    if manifest.get("augmented"):
        table.add_row("augmented", "slices added", f"{manifest['augmented']:,}")
    for name, n in manifest["splits"].items():
        table.add_row("split", name, f"{n:,}")
    for kind, n in manifest["pii_replacements"].items():
        table.add_row("pii", kind, f"{n:,}")
    tox = manifest["toxicity"]
    if tox["scored"]:
        table.add_row("toxicity", "mean / max (assistant)", f"{tox['mean']:.3f} / {tox['max']:.3f}")
        table.add_row("", "user turns flagged", f"{tox['flagged_user']:,}")
    conditioning = manifest.get("conditioning")
    if conditioning:
        table.add_row("conditioned", "conversations", f"{conditioning['conversations']:,}")
        table.add_row("", "turns regenerated", f"{conditioning['regenerated_turns']:,}")
        table.add_row("", "turns kept (unanswerable)", f"{conditioning['kept_turns']:,}")
    for stage in manifest["stages"]:
        table.add_row("seconds", stage["name"], f"{stage['seconds']:.1f}")
    table.add_row("seconds", "wall", f"{manifest['wall_seconds']:.1f}")
    return table


def manifest_metrics(manifest: dict) -> dict[str, float]:
    """A manifest's counts as flat MLflow metrics: records, drops and repairs by reason, splits, seconds."""
    metrics = {"input_records": manifest["input_records"], "kept": manifest["kept"]}
    metrics |= {f"dropped.{reason}": n for reason, n in manifest["dropped"].items()}
    metrics |= {f"repaired.{kind}": n for kind, n in manifest.get("repaired", {}).items()}
    metrics |= {f"split.{name}": n for name, n in manifest["splits"].items()}
    metrics |= {f"pii.{kind}": n for kind, n in manifest["pii_replacements"].items()}
    metrics |= {f"conditioning.{key}": n for key, n in (manifest.get("conditioning") or {}).items()}
    return metrics | {"wall_seconds": manifest["wall_seconds"]}


def track_curation(tracked, result) -> None:
    """The curation's MLflow run: its counts, the manifest, each source as a dataset input, and the fingerprint of
    what it wrote (the tag a training run's lineage is traced back by)."""
    from chatforge.storage import common_dir
    from chatforge.tracking import FINGERPRINT_TAG

    manifest = result.manifest
    tracked.metrics(manifest_metrics(manifest))
    tracked.document(manifest, "manifest.json")
    for source in manifest["sources"]:
        if source["files"]:
            tracked.dataset(common_dir(source["files"]), manifest["fingerprint"], name=source["name"], context="source")
    tracked.tags({f"{FINGERPRINT_TAG}.output": manifest["fingerprint"]})


def curate(
    spec: Annotated[Path, typer.Argument(help="curation spec (YAML), e.g. pipelines/curate.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
    input: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="input file/dir/glob (repeatable); replaces the spec's sources"),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", "-f", help="format of --input: sharegpt|openai|parquet|chitchat")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output directory")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the manifest as JSON on stdout")] = False,
) -> None:
    """Curate conversation corpora with Ray Data into OUTPUT/data, OUTPUT/dropped and OUTPUT/manifest.json."""
    from ray.exceptions import RayError

    from chatforge.data.pipeline import AccountingError, run_curation
    from chatforge.data.sources import SourceError, check_format, list_files
    from chatforge.runtime import RayConnectError, cause_line, init_ray
    from chatforge.tracking import command_run

    try:
        loaded = load_with_flags(spec, overrides, "curate.output", output)
        if input:
            sources = _inputs_as_sources(input, fmt, loaded.curate.read)
            loaded = loaded.model_copy(update={"curate": loaded.curate.model_copy(update={"sources": sources})})
        for source in loaded.curate.sources:  # a missing input or a wrong format fails here, before Ray starts
            check_format(source, list_files(source), loaded.curate.read)
        init_ray(loaded.ray)
        with command_run(loaded, "curate", output=loaded.curate.output) as tracked:
            with console.status("curating with Ray Data…"):
                result = run_curation(loaded, tracking=tracked.record())
            track_curation(tracked, result)
    except (SpecError, SourceError, RayConnectError) as err:
        fail(str(err))
    except RayError as err:  # a step's task or actor failed: its own error, not Ray's wrapping
        fail(f"curation failed (the previous output, if any, is unchanged): {cause_line(err)}", code=1)
    except AccountingError as err:  # a defect, not bad input: the previous output stays in place
        fail(f"{err} (the previous output, if any, is unchanged; please report this with the spec)", code=1)
    console.print(curation_table(result.manifest))
    console.print(
        f"data: [bold]{result.output}/data[/]   dropped: {result.output}/dropped   "
        f"manifest: {result.output}/manifest.json",
        highlight=False,
    )
    if json_out:
        print(json.dumps(result.manifest))
