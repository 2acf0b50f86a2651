"""Datasets, checkpoints and models in an object store, for clusters without a shared disk: an S3-compatible server
on 127.0.0.1 (moto's server mode) stands in for S3. Curation reads its dumps from `s3://` (files, globs, gzip) and
publishes its output there, manifest last. Training reads its curated data from `s3://`, keeps its
checkpoints there (`train.storage`) and resumes from them, and copies the exported model there (`train.model_uri`),
from where a serving replica downloads it."""

from __future__ import annotations

import json
import os

import pytest

from chatforge import storage
from chatforge.config import load_spec
from chatforge.train.trainer import run_training
from helpers.network import free_port
from helpers.train_data import TINY_TRAINING, write_curated

pytestmark = pytest.mark.integration

BUCKET = "chatforge"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server on 127.0.0.1 with a bucket, and a 2-CPU Ray whose workers see it (AWS_ENDPOINT_URL)."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CHATFORGE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield f"s3://{BUCKET}"
    finally:
        ray.shutdown()
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_training_reads_checkpoints_and_exports_through_s3_and_a_replica_serves_from_it(s3, tmp_path):
    local = write_curated(tmp_path / "curated", fingerprint="fp-s3").parent
    storage.copy_dir(str(local), f"{s3}/curated")
    overrides = [
        *TINY_TRAINING,
        f"train.data=[{{path: '{s3}/curated/data'}}]",
        f"train.output={tmp_path / 'out'}",
        f"train.storage={s3}/checkpoints",
        f"train.model_uri={s3}/models/tiny",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.eval_every=3",
    ]
    result = run_training(load_spec(None, overrides))
    assert result.summary["final_metrics"]["step"] == 6
    assert result.summary["fingerprint"] == "fp-s3"  # the manifest beside the data, read from the store
    checkpoints = [key for key in keys("checkpoints/") if not key.endswith("/")]  # not the directory markers
    assert checkpoints and all(key.startswith("checkpoints/out-") for key in checkpoints)
    assert any("/checkpoint_" in key for key in checkpoints)
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert {"models/tiny/config.json", "models/tiny/model.safetensors"} <= set(keys("models/tiny/"))

    # resumed from the checkpoints in the store
    more = run_training(load_spec(None, [*overrides, "train.resume=true", "train.max_steps=9"]))
    assert more.summary["final_metrics"]["step"] == 9
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row.get("event") == "resumed"] == [6]

    # a replica on a node without the file: the model comes from the store, once, into chatforge's cache
    from chatforge.config import EngineSpec
    from chatforge.serve.engine import Engine, SamplingParams
    from chatforge.serve.replica import local_model

    downloaded = local_model(f"{s3}/models/tiny")
    assert downloaded.startswith(os.environ["CHATFORGE_CACHE_DIR"]) and local_model(f"{s3}/models/tiny") == downloaded
    engine = Engine(downloaded, EngineSpec())
    ids = engine.encode_chat([{"role": "user", "content": "hello"}])

    import asyncio

    completion = asyncio.run(engine.complete(ids, SamplingParams(max_tokens=4, temperature=0)))
    assert completion.completion_tokens > 0


def test_missing_data_in_the_store_is_named(s3, tmp_path):
    from chatforge.train.data import TrainDataError, resolve_data_dir

    with pytest.raises(TrainDataError, match=r"s3://chatforge/nowhere/data: no train/ split here"):
        resolve_data_dir(f"{s3}/nowhere/data")


def test_curation_reads_dumps_from_the_store_and_publishes_its_output_there(s3, tmp_path):
    import gzip

    import boto3
    import pyarrow.parquet as pq

    from chatforge.data.pipeline import run_curation
    from helpers.corpus import write_sharegpt_jsonl

    client = boto3.client("s3")
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_sharegpt_jsonl(plain, 30, seed=1, pii_every=5)
    write_sharegpt_jsonl(packed, 20, seed=2)
    client.upload_file(str(plain), BUCKET, "dumps/2026/a.jsonl")
    client.put_object(Bucket=BUCKET, Key="dumps/2026/b.jsonl.gz", Body=gzip.compress(packed.read_bytes()))
    client.put_object(Bucket=BUCKET, Key="dumps/2026/notes.txt", Body=b"not a dump")
    client.put_object(Bucket=BUCKET, Key="curated/data/stale.parquet", Body=b"an earlier run's file")

    def curate(source_path: str):
        overrides = [
            f"curate.sources=[{{name: dumps, format: sharegpt, path: '{source_path}'}}]",
            f"curate.output={s3}/curated",
            "curate.steps=[normalize, filters, pii, dedup, split]",
            "curate.dedup.near=false",
        ]
        return run_curation(load_spec(None, overrides))

    result = curate(f"{s3}/dumps")  # a directory: its ShareGPT files, the rest skipped
    manifest = result.manifest
    assert result.output == f"{s3}/curated" and manifest["input_records"] == 50, manifest["dropped"]
    assert manifest["sources"][0]["files"] == [f"{s3}/dumps/2026/a.jsonl", f"{s3}/dumps/2026/b.jsonl.gz"]
    assert manifest["sources"][0]["skipped"] == [f"{s3}/dumps/2026/notes.txt"]
    assert sum(manifest["pii_replacements"].values()) > 0
    published = keys("curated/")
    assert "curated/data/stale.parquet" not in published  # the earlier output is replaced, not mixed in
    assert json.loads(storage.read_text(f"{s3}/curated/manifest.json")) == manifest
    rows = pq.read_table(f"{BUCKET}/curated/data", filesystem=storage.filesystem(s3)[0]).num_rows
    assert rows == manifest["rows_written"] == manifest["kept"]
    assert not os.listdir(os.path.join(os.environ["CHATFORGE_CACHE_DIR"], "curate"))  # the local twin is gone

    again = curate(f"{s3}/dumps/*/*.jsonl")  # a glob: one file
    assert again.manifest["input_records"] == 30
    assert again.manifest["fingerprint"] != manifest["fingerprint"]
    assert json.loads(storage.read_text(f"{s3}/curated/manifest.json"))["input_records"] == 30
