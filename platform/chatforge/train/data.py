"""Training data: curated conversations to the tokenizer and the tokenized, packed, mixed Ray Datasets a run trains on.

`prepare_training_data` does it all once: it checks the curated directories, trains the tokenizer (a scratch model)
or loads the model's, tokenizes every dataset with the chat template, mixes the datasets by weight and packs them into
fixed-length rows, materialized in Ray's object store. A search prepares the data once and every trial trains on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from chatforge import storage
from chatforge.config import Spec, TrainDataSpec
from chatforge.data.augment import with_tag
from chatforge.train.model import load_tokenizer
from chatforge.train.tokenize import TENSOR_KEYS, TokenizedSample, make_rows, tokenize_conversation

TOKENIZER_TRAINING_CONVERSATIONS = 50_000


class TrainDataError(ValueError):
    """Training data that cannot be used; the message names the directory."""


@dataclass
class PreparedData:
    """What every run on the same data shares: the tokenizer, and the tokenized, packed train and val datasets
    (materialized once; a search's trials all train on them)."""

    tokenizer: Any
    train: Any  # ray.data.Dataset
    val: Any
    stats: dict[str, Any]
    domains: list[str]
    data_dirs: list[str]


def prepare_training_data(spec: Spec, progress=None) -> PreparedData:
    """Tokenizer (trained for a scratch model, else the model's), then the tokenized, packed datasets."""
    say = progress or (lambda message: None)
    if not spec.train.data:
        raise TrainDataError("no training data: pass --data DIR (a curation output's data/) or set train.data")
    data_dirs = [resolve_data_dir(d.path) for d in spec.train.data]
    say("tokenizer")
    texts = _training_texts(data_dirs) if spec.model.from_scratch else None
    tokenizer = load_tokenizer(spec.model, texts)
    say("tokenizing and packing")
    train_ds, val_ds, data_stats = prepare_datasets(spec, spec.train.data, data_dirs, tokenizer)
    domains = [d.tag or Path(p).parent.name or f"data{i}" for i, (d, p) in enumerate(zip(spec.train.data, data_dirs))]
    return PreparedData(tokenizer, train_ds, val_ds, data_stats, domains, data_dirs)


def resolve_data_dir(path: str) -> str:
    """A curation output's data/ dir (holding train/ and val/); the curation output dir itself is accepted too. A
    local path or an object-store URI (``s3://bucket/curated/data``).

    The curation's manifest.json must be beside data/: a curation moves it into place last, so without it the data
    is not a finished curation's (and training.json could not name the data it came from).
    """
    directory = storage.absolute(path).rstrip("/")
    if storage.isdir(storage.join(directory, "data", "train")):
        directory = storage.join(directory, "data")
    for split in ("train", "val"):
        if not storage.isdir(storage.join(directory, split)):
            raise TrainDataError(f"{path}: no {split}/ split here; pass a curation output's data/ directory")
    manifest = manifest_path(directory)
    if not storage.isfile(manifest):
        raise TrainDataError(
            f"{path}: no {manifest}, so this is not a finished curation's output (a curation run that failed or was "
            "stopped leaves none); run `chatforge curate` to completion and pass its data/ directory"
        )
    return directory


def manifest_path(data_dir: str) -> str:
    """The curation manifest beside a data/ dir."""
    return storage.join(storage.dirname(data_dir), "manifest.json")


def read_manifest(data_dir: str) -> dict | None:
    """The curation manifest beside a data/ dir; None without one."""
    manifest = manifest_path(data_dir)
    return json.loads(storage.read_text(manifest)) if storage.isfile(manifest) else None


def data_fingerprint(data_dir: str) -> str | None:
    return (read_manifest(data_dir) or {}).get("fingerprint")


def combined_fingerprint(fingerprints: list[str | None]) -> str | None:
    """The training data's fingerprint: a curation's own for one dataset, a hash of them for several."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.blake2b(json.dumps(fingerprints).encode(), digest_size=16).hexdigest()


class TokenizeSamples:
    """Conversations -> one tokenized sample per row (variable length); ``supervised`` = 0 marks a skipped one."""

    def __init__(self, tokenizer, max_length: int, tag: str | None, domain: int):
        self.tokenizer, self.max_length, self.tag, self.domain = tokenizer, max_length, tag, domain

    def __call__(self, table: pa.Table) -> pa.Table:
        ids, labels, supervised = [], [], []
        for messages in table.column("messages").to_pylist():
            sample = tokenize_conversation(with_tag(messages, self.tag), self.tokenizer, self.max_length)
            ids.append(sample.input_ids if sample else [])
            labels.append(sample.labels if sample else [])
            supervised.append(sample.num_supervised if sample else 0)
        return pa.table(
            {
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
                "labels": pa.array(labels, pa.list_(pa.int32())),
                "supervised": pa.array(supervised, pa.int32()),
                "domain": pa.array([self.domain] * len(ids), pa.int32()),
            }
        )


class PackRows:
    """Samples -> fixed-length rows (packed, or one padded sample per row) with position and sequence ids."""

    def __init__(self, seq_len: int, pad_id: int, packing: bool):
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        samples = [
            TokenizedSample(i, lab)
            for i, lab in zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())
        ]
        rows = list(make_rows(samples, self.seq_len, self.pad_id, self.packing))
        out = {
            key: np.stack([row[key] for row in rows]).astype(np.int32)
            if rows
            else np.zeros((0, self.seq_len), np.int32)
            for key in TENSOR_KEYS
        }
        out["domain"] = np.full(len(rows), table.column("domain")[0].as_py() if len(table) else 0, np.int32)
        out["n_tokens"] = (out["sequence_ids"] >= 0).sum(axis=1).astype(np.int64)
        return out


def _training_texts(data: list[str]):
    import ray.data

    ds = ray.data.read_parquet([storage.join(d, "train") for d in data], columns=["messages"])
    for row in ds.limit(TOKENIZER_TRAINING_CONVERSATIONS).iter_rows():
        for message in row["messages"]:
            yield message["content"]


def prepare_datasets(spec: Spec, data: list[TrainDataSpec], data_dirs: list[str], tokenizer):
    """Tokenize and pack train and val of every dataset (mixed by weight), materialized once for all epochs."""
    import ray.data

    seq_len, pad_id = spec.model.max_length, tokenizer.pad_token_id
    samples = {"train": [], "val": []}
    for domain, (source, directory) in enumerate(zip(data, data_dirs)):
        for split in samples:
            ds = ray.data.read_parquet(storage.join(directory, split), columns=["messages"])
            fn = TokenizeSamples(tokenizer, seq_len, source.tag, domain)
            samples[split].append(ds.map_batches(fn, batch_format="pyarrow", batch_size=256).materialize())
    counts = [ds.count() for ds in samples["train"]]
    if not any(counts):
        raise TrainDataError("the training data has no conversations in train/")
    # Mixing by weight: keep each dataset's share at weight / total by down-sampling the over-represented ones.
    density = [source.weight / n if n else 0.0 for source, n in zip(data, counts)]
    fractions = [d / max(density) for d in density]
    stats: dict[str, Any] = {"datasets": []}
    packed = {}
    packer = PackRows(seq_len, pad_id, spec.train.packing)
    for split, parts in samples.items():
        rows = []
        for domain, ds in enumerate(parts):
            usable = ds.filter(expr=_col("supervised") > 0)
            skipped = ds.count() - usable.count()  # ds is materialized: both counts are cheap
            if split == "train" and fractions[domain] < 1.0:
                usable = usable.random_sample(fractions[domain], seed=spec.train.seed)
            if split == "val":  # every dataset gets its own share of each evaluation (per-source val loss)
                usable = usable.limit(spec.train.eval_batches * spec.train.batch_size)
            # Packed per dataset, so a row never mixes sources and its domain label is exact.
            rows.append(usable.map_batches(packer, batch_format="pyarrow", batch_size=1024))
            if split == "train":
                stats["datasets"].append(
                    {
                        "path": data_dirs[domain],
                        "weight": data[domain].weight,
                        "tag": data[domain].tag,
                        "conversations": counts[domain],
                        "skipped_no_supervised_tokens": skipped,
                        "sampled_fraction": round(fractions[domain], 6),
                    }
                )
        packed[split] = (rows[0].union(*rows[1:]) if len(rows) > 1 else rows[0]).materialize()
    n_rows = packed["train"].count()
    if n_rows == 0 or packed["val"].count() == 0:
        raise TrainDataError("after tokenization there is no train or no val row (are the conversations empty?)")
    tokens = packed["train"].sum("n_tokens")
    stats.update(
        train_rows=n_rows,
        val_rows=packed["val"].count(),
        train_tokens=int(tokens),
        packing_efficiency=round(tokens / (n_rows * seq_len), 4),
        skipped_no_supervised_tokens=sum(d["skipped_no_supervised_tokens"] for d in stats["datasets"]),
    )
    return packed["train"], packed["val"], stats


def _col(name: str):
    from ray.data.expressions import col

    return col(name)
