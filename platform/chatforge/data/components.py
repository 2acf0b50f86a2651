"""Connected components of a graph held in a Ray Dataset, by min-label propagation.

Dedup turns verified near-duplicate pairs into groups with this: each group keeps one row, so a chain of
near-copies (a~b, b~c, a!~c) must end as one component. The graph can be as large as the corpus, so it never
comes to the driver: every round is one hash-partitioned shuffle plus a per-block pass. A graph whose rounds fit
one partition (`PARTITION_BYTES`) runs every round in one task instead (`settle_block`): the same per-block pass,
without a Ray Data execution per round (~0.1-0.2 s each, most of a small graph's time).

Rows of the working dataset (columns ``node, neighbour, label, kind``; a row has a neighbour or a label):
    ADJACENT  ``node`` -- ``neighbour`` is an edge (both directions are stored)
    MESSAGE   a neighbour's new ``label``, offered to ``node``
    LABEL     ``node``'s current ``label``: the smallest node id it has heard of

One round: union the adjacency with last round's labels and messages, hash-partition by ``node`` (so a node's
label, messages and edges meet in one block), and in each block set label = min(label, messages); only nodes
whose label changed send it on to their neighbours. It stops when a round sends no message, i.e. no label changed.

The stop test counts rows with ``Dataset.count()`` on the materialized round, which Ray answers from block
metadata: every node has exactly one LABEL row, so messages = rows - nodes. (A ``sum`` aggregation per round would
cost a hash-aggregate shuffle, ~5 s a round on a 2-CPU machine, mostly worker start-up.) A component's labels
settle in about as many rounds as its diameter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data import Dataset

from chatforge.compat import block_refs

logger = logging.getLogger(__name__)

ADJACENT, MESSAGE, LABEL = 0, 1, 2

# A shuffle gets one hash partition per this many bytes of input (dedup's shuffles too): each partition is a reduce task,
# and on its first use a worker, however little it holds, so a small graph or corpus gets few, a large one many.
PARTITION_BYTES = 64 << 20
# A round's input is the adjacency plus at most one label and one message per adjacency row.
ONE_BLOCK_FACTOR = 3

WORK_SCHEMA = pa.schema(
    [("node", pa.string()), ("neighbour", pa.string()), ("label", pa.string()), ("kind", pa.int8())]
)
LABEL_SCHEMA = pa.schema([("node", pa.string()), ("label", pa.string())])


@dataclass(frozen=True)
class Components:
    labels: Dataset  # columns node, label
    rounds: int
    converged: bool


def partitions_for(nbytes: int, configured: int | None = None) -> int:
    """Hash partitions for a shuffle of ``nbytes``: ``configured`` when set, else one per ``PARTITION_BYTES``."""
    return configured or max(1, math.ceil(nbytes / PARTITION_BYTES))


def hash_partitioned(ds: Dataset, key: str, partitions: int) -> Dataset:
    """``ds`` in ``partitions`` blocks, every row with the same ``key`` in the same block.

    One partition is one block of all the rows, which needs no hashing: Ray Data's split repartition runs as plain
    tasks in the common worker pool. Its keyed shuffle runs map and reduce tasks in worker pools of their own (Ray
    Data 2.60 gives them a runtime env each), whose first use starts a worker per pool, one after the other: ~4 s
    of a 2-CPU run's dedup with the cores mostly idle, for a shuffle of a few MiB (docs/benchmarks.md).
    """
    if partitions == 1:
        return ds.repartition(1)
    return ds.repartition(partitions, keys=[key])


def without_empty_blocks(ds: Dataset) -> Dataset:
    """A materialized ``ds`` without its empty blocks (free: it only drops references).

    Ray 2.60's all-to-all operators can emit empty blocks with no columns, which `map_batches` passes through without
    calling the UDF; one of them in a keyed shuffle's input makes the reduce fail to concatenate ("Schema at index 1
    was different"), seen on a 1-CPU Ray with 30k rows and again at 120k rows.
    """
    refs = block_refs(ds)
    return ray.data.from_arrow_refs(refs) if refs else ray.data.from_arrow(WORK_SCHEMA.empty_table())


def _work_rows(kind: int, node, neighbour=None, label=None) -> pa.Table:
    """Rows of one ``kind``: ADJACENT rows carry a ``neighbour``, MESSAGE and LABEL rows a ``label``."""
    nulls = pa.nulls(len(node), pa.string())
    columns = [node, nulls if neighbour is None else neighbour, nulls if label is None else label]
    kinds = pa.array([kind] * len(node), pa.int8())
    return pa.table([*(pc.cast(c, pa.string()) for c in columns), kinds], schema=WORK_SCHEMA)


def adjacency_rows(edges: pa.Table) -> pa.Table:
    """Edges ``src, dst`` as ADJACENT rows in both directions (self-loops dropped)."""
    edges = edges.filter(pc.not_equal(edges["src"], edges["dst"]))
    forward = _work_rows(ADJACENT, edges["src"], neighbour=edges["dst"])
    return pa.concat_tables([forward, _work_rows(ADJACENT, edges["dst"], neighbour=edges["src"])])


def propagate_labels(block: pa.Table) -> pa.Table:
    """One round for the nodes of one hash partition: their new labels, and the messages the changed ones send.

    A node without a LABEL row (round one) starts from its own id, takes its neighbours' ids as offers (saving a
    round of broadcasting ids), and counts as changed.
    """
    kind = block["kind"]
    adjacency = block.filter(pc.equal(kind, ADJACENT))
    previous = block.filter(pc.equal(kind, LABEL))
    is_new = pc.invert(pc.is_in(adjacency["node"], value_set=previous["node"]))
    messages = block.filter(pc.equal(kind, MESSAGE))
    first_round = adjacency.filter(is_new)  # a new node's neighbours offer their own ids
    offers = pa.table(
        {
            "node": pa.concat_arrays([messages["node"].combine_chunks(), first_round["node"].combine_chunks()]),
            "label": pa.concat_arrays([messages["label"].combine_chunks(), first_round["neighbour"].combine_chunks()]),
        }
    )
    best_offer = offers.group_by("node").aggregate([("label", "min")])

    nodes = pc.unique(block["node"])
    previous_label = previous["label"].take(pc.index_in(nodes, value_set=previous["node"]))
    offered = best_offer["label_min"].take(pc.index_in(nodes, value_set=best_offer["node"]))
    current = pc.coalesce(previous_label, nodes)
    label = pc.min_element_wise(current, offered)  # a null offer (none received) is skipped
    changed = pc.or_(pc.is_null(previous_label), pc.not_equal(label, current))

    senders = nodes.filter(changed)
    outgoing = adjacency.filter(pc.is_in(adjacency["node"], value_set=senders))
    sent_label = label.filter(changed).take(pc.index_in(outgoing["node"], value_set=senders))
    return pa.concat_tables(
        [_work_rows(LABEL, nodes, label=label), _work_rows(MESSAGE, outgoing["neighbour"], label=sent_label)]
    )


def settle_block(adjacency: pa.Table, max_iterations: int) -> tuple[pa.Table, int, bool]:
    """Every round for a graph held whole in one block, until no label changes or ``max_iterations`` rounds: the
    last round's rows, the rounds taken, and whether the labels settled."""
    state, rounds = None, 0
    while rounds < max_iterations:
        rounds += 1
        state = propagate_labels(adjacency if state is None else pa.concat_tables([adjacency, state]))
        if not pc.any(pc.equal(state["kind"], MESSAGE)).as_py():
            return state, rounds, True
    return state, rounds, False


def label_rows(state: pa.Table) -> pa.Table:
    """A round's rows -> the nodes' labels (``node, label``)."""
    labels = state.filter(pc.equal(state["kind"], LABEL))
    return pa.table([labels["node"], labels["label"]], schema=LABEL_SCHEMA)


def block_components(edges: pa.Table, max_iterations: int) -> tuple[pa.Table, int, bool]:
    """`connected_components` of a graph held whole in one table, in this process: the labels (``node, label``),
    the rounds taken, and whether the labels settled (the caller reports that, see `report_rounds`)."""
    adjacency = adjacency_rows(edges)
    if adjacency.num_rows == 0:
        return LABEL_SCHEMA.empty_table(), 0, True
    state, rounds, converged = settle_block(adjacency, max_iterations)
    return label_rows(state), rounds, converged


def report_rounds(rounds: int, converged: bool, max_iterations: int, where: str) -> None:
    logger.info("connected components: %d rounds %s", rounds, where)
    if not converged:
        logger.warning(
            "connected components did not settle in %d rounds (dedup.max_iterations); some groups may keep "
            "more than one row",
            max_iterations,
        )


@ray.remote(num_returns=3)
def _settle_blocks(max_iterations: int, *blocks: pa.Table) -> tuple[pa.Table, int, bool]:
    state, rounds, converged = settle_block(pa.concat_tables(blocks), max_iterations)
    return label_rows(state), rounds, converged


def connected_components(edges: Dataset, num_partitions: int | None, max_iterations: int) -> Components:
    """Label every node of the graph ``edges`` (a Dataset of ``src, dst`` strings) with its component's smallest id.

    Nodes are only those that appear in an edge. If ``max_iterations`` rounds pass before the labels settle,
    the labels are still node ids of the same component (each no larger than the node's own id), but a component
    may keep more than one label; a warning says so. ``num_partitions`` None sizes each round's shuffle by its
    input (`partitions_for`).
    """
    adjacency = without_empty_blocks(edges.map_batches(adjacency_rows, batch_format="pyarrow").materialize())
    if adjacency.count() == 0:
        return Components(labels=ray.data.from_arrow(LABEL_SCHEMA.empty_table()), rounds=0, converged=True)
    if partitions_for(ONE_BLOCK_FACTOR * adjacency.size_bytes(), num_partitions) == 1:
        # Every round would be one block in one task: run them all in one task, not one Ray Data execution each.
        labels_ref, rounds_ref, converged_ref = _settle_blocks.remote(max_iterations, *block_refs(adjacency))
        rounds, converged = ray.get([rounds_ref, converged_ref])
        labels = ray.data.from_arrow_refs([labels_ref])
        report_rounds(rounds, converged, max_iterations, "in one task")
    else:
        state, rounds, converged = _rounds(adjacency, num_partitions, max_iterations)
        labels = state.map_batches(label_rows, batch_format="pyarrow")
        report_rounds(rounds, converged, max_iterations, "as Ray Data executions")
    return Components(labels=labels, rounds=rounds, converged=converged)


def _rounds(adjacency: Dataset, num_partitions: int | None, max_iterations: int) -> tuple[Dataset, int, bool]:
    """The rounds as Ray Data executions, each one hash-partitioned shuffle plus a pass per partition."""
    state, rounds, converged = None, 0, False
    while rounds < max_iterations:
        rounds += 1
        # Materialized each round: the next round reads it, and the counts below come from its block metadata.
        size = adjacency.size_bytes() + (0 if state is None else state.size_bytes())
        work = adjacency if state is None else adjacency.union(state)
        state = without_empty_blocks(
            hash_partitioned(work, "node", partitions_for(size, num_partitions))
            .map_batches(propagate_labels, batch_format="pyarrow", batch_size=None)
            .materialize()
        )
        if rounds == 1:
            # Round one: every node is new, so it sends one message per adjacency row.
            nodes = state.count() - adjacency.count()
        messages = state.count() - nodes
        logger.info("connected components: round %d, %d messages from changed labels", rounds, messages)
        if messages == 0:
            converged = True
            break
    return state, rounds, converged
