"""chatforge on a cluster of several nodes, simulated on this machine (`ray.cluster_utils.Cluster`: a head and two
worker nodes with their own resources): curation runs tasks on every node, and Ray Train runs one worker per node
with checkpoints in shared storage (`train.storage`), resuming when a worker node is lost mid-run."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chatforge.config import load_spec
from chatforge.data.pipeline import run_curation
from chatforge.train.trainer import run_training
from helpers.corpus import write_sharegpt_jsonl
from helpers.network import free_port
from helpers.train_data import TINY_TRAINING, write_curated
from helpers.train_faults import StallForNodeLoss

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOT = "train_slot"  # one per worker node: a training worker needs one, so there is one worker per node


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,  # the state API, which tells where tasks ran
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    workers = [cluster.add_node(num_cpus=1, resources={SLOT: 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_curation_runs_tasks_on_every_node(cluster, tmp_path):
    from ray.util.state import list_nodes, list_tasks

    corpus = tmp_path / "corpus.jsonl"
    write_sharegpt_jsonl(corpus, 3000, pii_every=7)
    spec = load_spec(
        None,
        [
            f"curate.sources=[{{name: big, format: sharegpt, path: '{corpus}'}}]",
            f"curate.output={tmp_path / 'out'}",
            "curate.read.range_bytes=65536",  # many read tasks, so every node gets some
            "curate.steps=[normalize, filters, pii, dedup, split]",
        ],
    )
    manifest = run_curation(spec).manifest
    assert manifest["input_records"] == 3000 and manifest["kept"] + sum(manifest["dropped"].values()) == 3000
    nodes = {node.node_id for node in list_nodes() if node.state == "ALIVE"}
    ran = {
        task.node_id for task in list_tasks(detail=True, limit=10_000) if task.node_id and task.type == "NORMAL_TASK"
    }
    assert nodes <= ran, f"nodes without a task: {nodes - ran}"


def test_training_runs_a_worker_per_node_and_resumes_after_losing_one(cluster, tmp_path):
    ray_cluster, workers = cluster
    data = write_curated(tmp_path / "curated")
    storage, marker = tmp_path / "shared", tmp_path / "stalled-node"
    spec = load_spec(
        None,
        [
            *TINY_TRAINING,
            f"train.data=[{{path: '{data}'}}]",
            f"train.output={tmp_path / 'out'}",
            f"train.storage={storage}",
            "train.max_steps=12",
            "train.checkpoint_every=4",
            "train.eval_every=6",
            f"scaling.resources_per_worker={{{SLOT}: 1}}",
            "scaling.max_failures=2",
        ],
    )
    # Training runs in a thread; this one removes the stalled worker's node and adds a fresh one, as an autoscaler
    # would (a node is added from the main thread: Ray sets signal handlers for the processes it starts).
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(run_training, spec, step_callbacks=[StallForNodeLoss(5, str(marker))])
        deadline = time.monotonic() + 300
        while not marker.exists() and not training.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        lost = marker.read_text() if marker.exists() else None
        if lost:
            ray_cluster.remove_node(next(node for node in workers if node.node_id == lost), allow_graceful=False)
            workers.append(ray_cluster.add_node(num_cpus=1, resources={SLOT: 1}))
        result = training.result(timeout=600)

    assert lost, "the worker never stalled at step 5"
    assert result.summary["final_metrics"]["step"] == 12
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    resumed = [row for row in rows if row.get("event") == "resumed"]
    assert [row["step"] for row in resumed] == [4]  # from the checkpoint of step 4, on the new node
    # the checkpoints are in the shared storage, under a run name of this output's own
    (run_dir,) = [p for p in Path(storage).iterdir() if p.is_dir()]
    assert run_dir.name.startswith("out-") and list(run_dir.glob("checkpoint_*"))
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert (tmp_path / "out" / "model" / "config.json").is_file()
