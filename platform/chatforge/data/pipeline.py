"""The curation pipeline: read every source, run the steps named in the spec, write once, account for every record.

Rows flow through every step (mark, don't filter) and are split only at the write, in one streaming pass:
each block is tagged with its destination (a split under ``data/``, or ``dropped/``) and also yields one small
stats row, so the manifest's counts come from the same pass that wrote the files. They are then checked against
what the readers emitted (counted apart, see `sources.ReadCounts`) and the row counts of the written files.

    OUTPUT/data/{train,val,test}/*.parquet   kept rows (and augmented slices), by split
    OUTPUT/dropped/*.parquet                 every rejected or malformed row, with drop_reason and raw text
    OUTPUT/manifest.json                     input_records == kept + sum(dropped.values())

A run writes into a directory beside OUTPUT and moves its outputs into place only once the counts check out, so a
run that fails leaves the previous output as it was.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import chatforge
from chatforge import storage
from chatforge.config import CurateSpec, Spec, resolved
from chatforge.data.augment import AugmentStep
from chatforge.data.batches import apply_steps
from chatforge.data.condition import CONDITIONED_COLUMN, ConditionStep, conditioning_summary
from chatforge.data.dedup import DedupStep
from chatforge.data.filters import REPAIRS, FiltersStep
from chatforge.data.normalize import NormalizeStep
from chatforge.data.pii import PiiStep
from chatforge.data.schema import STAGE_SECONDS_COLUMN
from chatforge.data.sources import (
    DATASET_FORMAT,
    DatasetSource,
    ReadCounts,
    SourceError,
    check_format,
    dataset_source,
    read_dataset_source,
    read_source,
    scan_source,
)
from chatforge.data.split import SplitStep
from chatforge.data.toxicity import ToxicityStep

STEPS = {
    "normalize": NormalizeStep,
    "filters": FiltersStep,
    "pii": PiiStep,
    "dedup": DedupStep,
    "condition": ConditionStep,
    "toxicity": ToxicityStep,
    "augment": AugmentStep,
    "split": SplitStep,
}

BUCKET_COLUMN = "_bucket"
STATS_BUCKET = "_stats"
DROPPED_BUCKET = "dropped"
UNSPLIT_BUCKET = "all"  # kept rows when the spec has no split step
TOXICITY_BINS = 10


def build_steps(curate: CurateSpec, workdir: str | None = None) -> list:
    """The spec's steps in order; ``workdir`` is where a step that stages rows (dedup) may write."""
    return [
        DedupStep(curate.dedup, workdir=workdir) if name == "dedup" else STEPS[name](getattr(curate, name))
        for name in curate.steps
    ]


def curated_dataset(
    curate: CurateSpec,
    workdir: str | None = None,
    counts: ReadCounts | None = None,
    datasets: list[DatasetSource] = (),
):
    """The Ray Dataset of every input record after every step: the spec's sources' and ``datasets``' (Ray Datasets
    of conversations, see `read_dataset_source`).

    Lazy up to dedup, which runs everything before it once (staging the rows under ``workdir``); the rest runs when
    the dataset is consumed, which must happen before ``workdir`` is removed. ``counts`` hears what the readers emit.
    """
    parts = [read_source(source, curate.read, curate.normalize, counts) for source in curate.sources]
    parts += [read_dataset_source(source, curate.normalize, counts) for source in datasets]
    if not parts:
        raise SourceError("curate.sources is empty and no dataset was given: nothing to curate")
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return apply_steps(ds, build_steps(curate, workdir))


# ---------------------------------------------------------------- per-block accounting (pure)


def _bucket(row: dict[str, Any]) -> str:
    if row.get("drop_reason") is not None:
        return DROPPED_BUCKET
    return row.get("split") or UNSPLIT_BUCKET


def block_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What one block contributes to the manifest."""
    stats: dict[str, Any] = {
        "input_records": 0,
        "kept": 0,
        "augmented": 0,
        "augmented_dropped": 0,
        "dropped": Counter(),
        "repaired": Counter(),
        "splits": Counter(),
        "pii_replacements": Counter(),
        "stage_seconds": Counter(),
        "toxicity_histogram": [0] * TOXICITY_BINS,
        "toxicity_scored": 0,
        "toxicity_sum": 0.0,
        "toxicity_max": None,
        "toxicity_flagged_user": 0,
        "conditioning": Counter(),
    }
    for row in rows:
        stats["stage_seconds"].update(dict(row.get(STAGE_SECONDS_COLUMN) or []))
        augmented = bool(row.get("augmented"))
        bucket = _bucket(row)
        if augmented:
            stats["augmented"] += bucket != DROPPED_BUCKET
            stats["augmented_dropped"] += bucket == DROPPED_BUCKET
        else:
            stats["input_records"] += 1
            if bucket == DROPPED_BUCKET:
                stats["dropped"][row["drop_reason"]] += 1
            else:
                stats["kept"] += 1
                stats["repaired"].update(row.get("repairs") or [])
            stats["pii_replacements"].update({k: v for k, v in (row.get("pii_counts") or {}).items() if v})
            score = row.get("toxicity")
            if score is not None:
                stats["toxicity_scored"] += 1
                stats["toxicity_sum"] += score
                stats["toxicity_max"] = max(score, stats["toxicity_max"] or 0.0)
                stats["toxicity_histogram"][min(int(score * TOXICITY_BINS), TOXICITY_BINS - 1)] += 1
            stats["toxicity_flagged_user"] += bool(row.get("toxicity_flag"))
            conditioned = row.get(CONDITIONED_COLUMN)
            if conditioned:
                stats["conditioning"].update(
                    conversations=int(conditioned["regenerated"] > 0),
                    regenerated_turns=conditioned["regenerated"],
                    kept_turns=conditioned["kept"],
                )
        if bucket != DROPPED_BUCKET:
            stats["splits"][bucket] += 1
    return stats


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total = block_stats([])
    for part in parts:
        for key, value in part.items():
            if key == "toxicity_histogram":
                total[key] = [a + b for a, b in zip(total[key], value)]
            elif key == "toxicity_max":
                if value is not None:
                    total[key] = max(value, total[key] or 0.0)
            elif isinstance(total[key], Counter):
                total[key].update(value)
            else:
                total[key] += value
    return total


@functools.cache
def _records_counter():
    from ray.util.metrics import Counter

    return Counter(
        "chatforge_curate_records_total",
        description="input records through curation's write, kept or dropped (by drop reason)",
        tag_keys=("outcome", "reason"),
    )


def export_counts(stats: dict[str, Any]) -> None:
    """A block's kept and dropped records as Ray metrics (``chatforge_curate_records_total``), counted as the write
    goes: the Ray dashboard and Grafana see a run's curation progress while it runs."""
    counter = _records_counter()
    if stats["kept"]:
        counter.inc(stats["kept"], tags={"outcome": "kept", "reason": ""})
    for reason, n in stats["dropped"].items():
        counter.inc(n, tags={"outcome": "dropped", "reason": reason})


class TagForWrite:
    """Tag each row with its output bucket and append one stats row per block (bucket ``_stats``)."""

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        stats = block_stats(rows)
        export_counts(stats)
        stats_row = {name: None for name in table.column_names}
        stats_row["meta"] = json.dumps(stats)
        buckets = [_bucket(row) for row in rows] + [STATS_BUCKET]
        table = pa.concat_tables([table, pa.Table.from_pylist([stats_row], schema=table.schema)])
        table = table.drop_columns([STAGE_SECONDS_COLUMN]) if STAGE_SECONDS_COLUMN in table.column_names else table
        return table.append_column(BUCKET_COLUMN, pa.array(buckets, pa.string()))


# ---------------------------------------------------------------- writing and the manifest


@dataclass
class CurationResult:
    output: str
    manifest: dict[str, Any]
    files: dict[str, list[str]] = field(default_factory=dict)


def input_fingerprint(spec: Spec, files: dict[str, list[str]], datasets: list[DatasetSource] = ()) -> str:
    """A hash of the resolved config and the inputs (path, size, and the head and tail of each file; each dataset
    source's row fingerprint).

    ``files``: each source's files, by source name (as `list_files` gives them).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(resolved(spec.curate), sort_keys=True).encode())
    for source in datasets:
        digest.update(f"{DATASET_FORMAT}\x00{source.name}\x00{source.rows}\x00{source.fingerprint}".encode())
    for source in spec.curate.sources:
        for path in files[source.name]:
            size = storage.size(path)
            digest.update(f"{source.name}\x00{os.path.basename(path)}\x00{size}".encode())
            with storage.open_binary(path) as f:
                digest.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    digest.update(f.read())
    return digest.hexdigest()


def _collect_stats(stats_dir: str) -> dict[str, Any]:
    parts = []
    if os.path.isdir(stats_dir):
        for name in sorted(os.listdir(stats_dir)):
            if name.endswith(".parquet"):
                parts += [
                    json.loads(m)
                    for m in pq.read_table(os.path.join(stats_dir, name), columns=["meta"])["meta"].to_pylist()
                ]
    return merge_stats(parts)


def _count_rows(directory: str) -> int:
    if not os.path.isdir(directory):
        return 0
    return sum(
        pq.ParquetFile(os.path.join(root, n)).metadata.num_rows
        for root, _, names in os.walk(directory)
        for n in names
        if n.endswith(".parquet")
    )


def _toxicity_summary(stats: dict[str, Any]) -> dict[str, Any]:
    scored = stats["toxicity_scored"]
    return {
        "scored": scored,
        "mean": round(stats["toxicity_sum"] / scored, 6) if scored else None,
        "max": stats["toxicity_max"],
        "histogram": {
            f"{i / TOXICITY_BINS:.1f}-{(i + 1) / TOXICITY_BINS:.1f}": n
            for i, n in enumerate(stats["toxicity_histogram"])
        },
        "flagged_user": stats["toxicity_flagged_user"],
        "dropped_assistant": stats["dropped"].get("toxic_assistant", 0),
        "dropped_user": stats["dropped"].get("toxic_user", 0),
    }


class AccountingError(RuntimeError):
    """A run whose counts do not add up; its output is not moved into place."""


def check_accounting(
    read_records: int, unreported: list[str], stats: dict[str, Any], data_rows: int, dropped_rows: int
) -> None:
    """Raise `AccountingError` unless every record the readers emitted reached the write, once, and the written files
    hold the rows the write pass counted. ``unreported``: read tasks that never reported their count."""
    dropped = sum(stats["dropped"].values())
    problems = []
    if read_records != stats["input_records"]:
        problems.append(
            f"the readers emitted {read_records:,} records but {stats['input_records']:,} reached the write "
            f"(kept {stats['kept']:,} + dropped {dropped:,})"
        )
    if unreported:
        more = f" and {len(unreported) - 3} more" if len(unreported) > 3 else ""
        problems.append(f"{len(unreported)} read tasks never reported a count: {', '.join(unreported[:3])}{more}")
    if data_rows != stats["kept"] + stats["augmented"]:
        problems.append(
            f"{data_rows:,} rows in data/ but the pass counted {stats['kept']:,} kept + {stats['augmented']:,} "
            "augmented"
        )
    if dropped_rows != dropped + stats["augmented_dropped"]:
        problems.append(
            f"{dropped_rows:,} rows in dropped/ but the pass counted {dropped:,} dropped + "
            f"{stats['augmented_dropped']:,} dropped slices"
        )
    if problems:
        raise AccountingError("accounting mismatch: " + "; ".join(problems))


def _write_staged(
    curate: CurateSpec, staging: str, datasets: list[DatasetSource] = ()
) -> tuple[dict[str, Any], ReadCounts]:
    """Run the pipeline into ``staging``: data/ and dropped/ there, the write pass's stats and the readers' counts."""
    written = os.path.join(staging, ".written")  # Ray Data's write, partitioned by bucket
    workdir = os.path.join(staging, ".work")  # dedup's staged rows
    counts = ReadCounts(os.path.join(staging, ".read-counts"))
    os.makedirs(workdir)
    os.makedirs(counts.directory)
    try:
        ds = curated_dataset(curate, workdir, counts, datasets).map_batches(
            TagForWrite(), batch_format="pyarrow", batch_size=None
        )
        ds.write_parquet(written, partition_cols=[BUCKET_COLUMN])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stats = _collect_stats(os.path.join(written, f"{BUCKET_COLUMN}={STATS_BUCKET}"))
    os.makedirs(os.path.join(staging, "data"))
    for name in sorted(os.listdir(written)):
        bucket = name.partition("=")[2]
        if bucket == STATS_BUCKET:
            continue
        target = os.path.join(staging, "dropped") if bucket == DROPPED_BUCKET else os.path.join(staging, "data", bucket)
        os.rename(os.path.join(written, name), target)
    os.makedirs(os.path.join(staging, "dropped"), exist_ok=True)
    shutil.rmtree(written)
    return stats, counts


OUTPUT_ENTRIES = ("manifest.json", "data", "dropped")  # what a run replaces in OUTPUT; anything else there stays


def move_into_place(staging: str, output: str) -> None:
    """Replace OUTPUT's entries with the staged ones. The old manifest goes first and the new one comes last, so
    OUTPUT never holds a manifest.json beside data it does not describe (training requires one). A move that fails
    part way puts the previous entries back before the error propagates."""
    os.makedirs(output, exist_ok=True)
    previous = os.path.join(staging, ".previous")  # removed with the staging directory
    os.makedirs(previous)
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for entry in OUTPUT_ENTRIES:
            if os.path.lexists(os.path.join(output, entry)):
                shutil.move(os.path.join(output, entry), os.path.join(previous, entry))
                moved_out.append(entry)
        for entry in reversed(OUTPUT_ENTRIES):
            shutil.move(os.path.join(staging, entry), os.path.join(output, entry))
            moved_in.append(entry)
    except BaseException:
        for entry in moved_in:  # the new entries out again, then the old ones back, the manifest last
            shutil.move(os.path.join(output, entry), os.path.join(staging, entry))
        for entry in reversed(moved_out):
            shutil.move(os.path.join(previous, entry), os.path.join(output, entry))
        raise


def staging_dir(output: str, run_id: str) -> str:
    """Where a run writes before its output is moved into place: beside OUTPUT, so the move is a rename."""
    parent, name = os.path.split(output)
    return os.path.join(parent, f".{name}.staging-{run_id}")


def run_curation(
    spec: Spec, tracking: dict[str, Any] | None = None, datasets: dict[str, Any] | None = None
) -> CurationResult:
    """Curate per ``spec.curate`` into ``spec.curate.output``; Ray must already be initialised.

    ``tracking``: the command's MLflow run (`TrackedRun.record`), written into the manifest so the files name it.
    ``datasets``: more sources, as Ray Datasets of conversations by source name (`read_dataset_source` says which
    columns), beside or instead of ``spec.curate.sources``.

    Everything is written beside OUTPUT first (`staging_dir`) and moved into place once the counts check out
    (`check_accounting`); a run that fails raises, leaves OUTPUT as it was, and removes what it staged.
    """
    curate = spec.curate
    remote = curate.output if storage.is_uri(curate.output) else None
    # an object-store OUTPUT: the run writes and checks a local twin, then publishes it (`storage.publish_dir`)
    output = os.path.join(local_twin_root(), storage.uri_key(remote)) if remote else os.path.abspath(curate.output)
    started = time.perf_counter()
    scanned = {source.name: scan_source(source) for source in curate.sources}
    for source in curate.sources:
        check_format(source, scanned[source.name].files, curate.read)
    files = {name: found.files for name, found in scanned.items()}
    given = [dataset_source(name, ds) for name, ds in (datasets or {}).items()]
    taken = {source.name for source in curate.sources} & {source.name for source in given}
    if taken:
        raise SourceError(f"datasets {sorted(taken)}: curate.sources has sources of these names")
    fingerprint = input_fingerprint(spec, files, given)
    staging = staging_dir(output, uuid.uuid4().hex[:8])
    try:
        stats, counts = _write_staged(curate, staging, given)
        read_records, unreported = counts.total()
        shutil.rmtree(counts.directory)
        written = _count_rows(os.path.join(staging, "data"))
        dropped_written = _count_rows(os.path.join(staging, "dropped"))
        check_accounting(read_records, unreported, stats, written, dropped_written)
        manifest = {
            "input_records": read_records,
            "kept": stats["kept"],
            "dropped": dict(sorted(stats["dropped"].items(), key=lambda kv: (-kv[1], kv[0]))),
            "repaired": {kind: stats["repaired"].get(kind, 0) for kind in REPAIRS},
            "augmented": stats["augmented"],
            "rows_written": written,
            "dropped_rows_written": dropped_written,
            "splits": dict(sorted(stats["splits"].items())),
            "pii_replacements": dict(sorted(stats["pii_replacements"].items())),
            "toxicity": _toxicity_summary(stats),
            "conditioning": conditioning_summary(stats["conditioning"]) if "condition" in curate.steps else None,
            "stages": [
                {"name": name, "seconds": round(stats["stage_seconds"].get(name, 0.0), 3)}
                for name in ["read", *curate.steps]
            ],
            "wall_seconds": round(time.perf_counter() - started, 3),
            "sources": [
                *(
                    {"name": s.name, "format": s.format, "files": files[s.name], "skipped": scanned[s.name].skipped}
                    for s in curate.sources
                ),
                *(
                    {"name": s.name, "format": DATASET_FORMAT, "files": [], "skipped": [], "rows": s.rows}
                    for s in given
                ),
            ],
            "config": resolved(curate),
            "fingerprint": fingerprint,
            "tracking": tracking,
            "chatforge_version": chatforge.__version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with open(os.path.join(staging, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        move_into_place(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if remote:
        try:
            storage.publish_dir(output, remote, last="manifest.json")
        finally:
            shutil.rmtree(output, ignore_errors=True)
        return CurationResult(output=remote, manifest=manifest)
    return CurationResult(output=output, manifest=manifest)


def local_twin_root() -> str:
    """Where a curation whose OUTPUT is in an object store writes before publishing: chatforge's cache dir
    (`train.pretrained.cache_dir`, as the model downloads use) + ``curate``. On several nodes it must be a directory every node sees, as a local
    OUTPUT must be: Ray Data's write tasks and dedup's staged rows run on any node."""
    from chatforge.train.pretrained import cache_dir

    return str(cache_dir() / "curate")
