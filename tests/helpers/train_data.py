"""Small curated datasets on disk, in the layout `chatforge curate` writes (data/train, data/val, manifest.json)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from chatforge.data.schema import MESSAGE_TYPE
from helpers.corpus import conversation


def write_curated(root: Path, n_train: int = 160, n_val: int = 24, seed: int = 0, fingerprint: str = "fp-test") -> Path:
    """Writes root/data/{train,val}/part.parquet and root/manifest.json; returns root/data."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = [
            {"id": f"{split}{i}", "messages": conversation(rng, turns=rng.choice([2, 4]), words=(4, 9))}
            for i in range(n)
        ]
        table = pa.table(
            {"id": [r["id"] for r in rows], "messages": pa.array([r["messages"] for r in rows], pa.list_(MESSAGE_TYPE))}
        )
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / "data" / split / "part.parquet")
    (root / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return root / "data"


TINY_TRAINING = [
    "ray.num_cpus=2",
    "model.name_or_path=scratch",
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "model.max_length=96",
    "model.vocab_size=400",
    "model.dropout=0.0",
    "train.batch_size=4",
    "train.lr=0.003",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.eval_every=6",
    "train.eval_batches=2",
    "scaling.num_workers=2",
]
