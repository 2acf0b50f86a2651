"""The curation pipeline: read every source, run the steps named in the spec, write once, account for every record.

Rows flow through every step (mark, don't filter) and are split only at the write, in one streaming pass:
each block is tagged with its destination (a split under ``data/``, or ``dropped/``) and also yields one small
stats row, so the manifest's counts come from the same pass that wrote the files, and are then checked against the
row counts in the written files.

    OUTPUT/data/{train,val,test}/*.parquet   kept rows (and augmented slices), by split
    OUTPUT/dropped/*.parquet                 every rejected or malformed row, with drop_reason and raw text
    OUTPUT/manifest.json                     input_records == kept + sum(dropped.values())
"""

from __future__ import annotations

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
from chatforge.config import CurateSpec, Spec, resolved
from chatforge.data.augment import AugmentStep
from chatforge.data.dedup import DedupStep
from chatforge.data.filters import REPAIRS, FiltersStep
from chatforge.data.normalize import NormalizeStep
from chatforge.data.pii import PiiStep
from chatforge.data.schema import STAGE_SECONDS_COLUMN, apply_steps
from chatforge.data.sources import list_files, read_source
from chatforge.data.split import SplitStep
from chatforge.data.toxicity import ToxicityStep
from chatforge.runtime import fix_ray_data_first_limits

STEPS = {
    "normalize": NormalizeStep,
    "filters": FiltersStep,
    "pii": PiiStep,
    "dedup": DedupStep,
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


def curated_dataset(curate: CurateSpec, workdir: str | None = None):
    """The Ray Dataset of every input record after every step.

    Lazy up to dedup, which runs everything before it once (staging the rows under ``workdir``); the rest runs when
    the dataset is consumed, which must happen before ``workdir`` is removed.
    """
    parts = [read_source(source, curate.read, curate.normalize) for source in curate.sources]
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
    }
    for row in rows:
        stats["stage_seconds"].update(dict(row.get(STAGE_SECONDS_COLUMN) or []))
        augmented = bool(row.get("augmented"))
        bucket = _bucket(row)
        if augmented:
            stats["augmented"] += bucket != DROPPED_BUCKET
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


class TagForWrite:
    """Tag each row with its output bucket and append one stats row per block (bucket ``_stats``)."""

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        stats_row = {name: None for name in table.column_names}
        stats_row["meta"] = json.dumps(block_stats(rows))
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


def input_fingerprint(spec: Spec, files: dict[str, list[str]]) -> str:
    """A hash of the resolved config and the inputs (path, size, and the head and tail of each file).

    ``files``: each source's files, by source name (as `list_files` gives them).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(resolved(spec.curate), sort_keys=True).encode())
    for source in spec.curate.sources:
        for path in files[source.name]:
            size = os.path.getsize(path)
            digest.update(f"{source.name}\x00{os.path.basename(path)}\x00{size}".encode())
            with open(path, "rb") as f:
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


def run_curation(spec: Spec) -> CurationResult:
    """Curate per ``spec.curate`` into ``spec.curate.output``; Ray must already be initialised."""
    fix_ray_data_first_limits()
    curate = spec.curate
    output = os.path.abspath(curate.output)
    started = time.perf_counter()
    files = {source.name: list_files(source) for source in curate.sources}
    fingerprint = input_fingerprint(spec, files)
    run_id = uuid.uuid4().hex[:8]
    staging = os.path.join(output, f".staging-{run_id}")
    workdir = os.path.join(output, f".work-{run_id}")
    for stale in ("data", "dropped", "manifest.json"):
        target = os.path.join(output, stale)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    os.makedirs(workdir, exist_ok=True)
    try:
        ds = curated_dataset(curate, workdir).map_batches(TagForWrite(), batch_format="pyarrow", batch_size=None)
        ds.write_parquet(staging, partition_cols=[BUCKET_COLUMN])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    stats = _collect_stats(os.path.join(staging, f"{BUCKET_COLUMN}={STATS_BUCKET}"))
    os.makedirs(os.path.join(output, "data"), exist_ok=True)
    for name in sorted(os.listdir(staging)):
        bucket = name.partition("=")[2]
        if bucket == STATS_BUCKET:
            continue
        target = os.path.join(output, "dropped") if bucket == DROPPED_BUCKET else os.path.join(output, "data", bucket)
        shutil.move(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(output, "dropped"), exist_ok=True)

    written = _count_rows(os.path.join(output, "data"))
    if written != stats["kept"] + stats["augmented"]:
        raise RuntimeError(
            f"accounting mismatch: {written} rows in data/ but the pass counted "
            f"{stats['kept']} kept + {stats['augmented']} augmented"
        )
    manifest = {
        "input_records": stats["input_records"],
        "kept": stats["kept"],
        "dropped": dict(sorted(stats["dropped"].items(), key=lambda kv: (-kv[1], kv[0]))),
        "repaired": {kind: stats["repaired"].get(kind, 0) for kind in REPAIRS},
        "augmented": stats["augmented"],
        "rows_written": written,
        "splits": dict(sorted(stats["splits"].items())),
        "pii_replacements": dict(sorted(stats["pii_replacements"].items())),
        "toxicity": _toxicity_summary(stats),
        "stages": [
            {"name": name, "seconds": round(stats["stage_seconds"].get(name, 0.0), 3)}
            for name in ["read", *curate.steps]
        ],
        "wall_seconds": round(time.perf_counter() - started, 3),
        "sources": [{"name": s.name, "format": s.format, "files": files[s.name]} for s in curate.sources],
        "config": resolved(curate),
        "fingerprint": fingerprint,
        "chatforge_version": chatforge.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    assert manifest["input_records"] == manifest["kept"] + sum(manifest["dropped"].values())
    with open(os.path.join(output, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return CurationResult(output=output, manifest=manifest)
