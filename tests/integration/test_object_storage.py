"""Datasets, checkpoints and models in an object store, for clusters without a shared disk: an S3-compatible server
on 127.0.0.1 (moto's server mode) stands in for S3. Training reads its curated data from `s3://`, keeps its
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
