"""Curation throughput, CPU scaling and streaming memory: the Ray Data pipeline vs one process with the same functions.

    .venv/bin/python benchmarks/curate.py --json          # 30k conversations; ~15 minutes on 2 cores

Generates a ShareGPT JSONL corpus of synthetic multi-turn conversations (with PII in 1 of 10 and a near-copy in
1 of 25), then measures, in one run:
  (a) the Ray pipeline (`chatforge curate`, all default steps) at ray.num_cpus=2, and at 1 for the speed-up (the
      1-CPU run pinned to one core with sched_setaffinity, Ray's processes included, so that 2 cores are compared
      with 1; ``--pairs`` (5) pairs of runs back to back, in alternating order, the median of their ratios; the
      unpinned ray.num_cpus=1 run, which still gets the second core for Ray's own processes, is reported as well);
  (b) a single-process loop applying the same per-batch functions (parse, normalize, filters, PII, dedup with the
      same MinHash signatures, band rows and sketch verification on one block of all bands, toxicity with the same
      scorer, augment, split, write);
  (c) the peak memory (PSS of the whole process tree, Ray's processes included) at 1x and 4x the input, in runs of
      their own (sampling takes CPU), and the speed-up once more on the 4x input.
Throughput counts the pipeline itself (the manifest's wall_seconds), not Ray's start-up, reported apart.
Prints one JSON line last.

Peer mode, against datatrove 0.10.1 (the `dev` extra installs it):

    .venv/bin/python benchmarks/curate.py --peer datatrove --n 30000 --json

runs only the peer comparison (none of (a)-(c) above: they take ~15 minutes and answer other questions). For 1x
(``--n``, seed 1) and 4x (seed 2) the same corpus as above goes through
  - chatforge: `chatforge curate` with the default steps at ray.num_cpus=2, as in (a);
  - datatrove: read the ShareGPT JSONL (a Document per conversation: its turns' text one per line, its id), MinHash
    signatures -> buckets -> cluster (datatrove's four-stage MinHash: 16 buckets of 8 hashes, 5-word shingles, i.e.
    chatforge's 128 permutations in 16 bands; whitespace words, as its English tokenizer needs spaCy), then read
    again -> drop the duplicates -> PIIFormatter -> JsonlWriter; LocalPipelineExecutor with tasks=2, workers=2 (16
    tasks on 2 workers for the buckets, 1 task for the cluster). datatrove parallelizes over files, so its input is
    the corpus cut into 2 files (not timed).
Each wall time is one fresh process from start to exit: the interpreter, imports, Ray's start-up and teardown for
chatforge, datatrove's worker pools for each stage. ``ratio`` = chatforge's wall / datatrove's (targets, reported,
not asserted: <= 1 at 1x, <= 0.6 at 4x). Seeded PII left: the values PII_SNIPPETS (tests/helpers/corpus.py) plants,
matched by kind (email, phone, card, iban, ip, secret) with a pattern of the snippet's own format, counted in the
input (``pii_seeded``) and in each side's kept output (chatforge: kept rows' turns and meta; datatrove: written
documents' text and metadata); near-copies that dedup drops take their copy of a value with them.
The two do not do the same work, so read the ratio with this in mind:
  - chatforge also normalizes text, filters turns (alternation, lengths, empty turns), does exact dedup before
    MinHash and verifies MinHash candidates on the sketches, scores toxicity, splits train/val/test, keeps the
    conversations' structure (roles, turns) and writes Parquet with a manifest that accounts for every record;
    datatrove writes the joined text as JSONL, and counts every band collision as a duplicate.
  - datatrove's PIIFormatter replaces only emails and IP addresses (here private ones too: its default replaces only
    public IPs, and the seeded ones are 10.0.x.x); phones, cards, IBANs and secret keys stay by design.
  - datatrove formats PII after dedup, on the rows it keeps; chatforge scrubs before dedup, on every row.
  - datatrove's JSONL reader and writer need orjson (its `io` extra), which chatforge does not install: without it
    the run uses the same reader and writer on the standard library's json (``datatrove_json_library``). Its MinHash
    hashes shingles with xxhash64 as a str, which the installed xxhash 4 refuses (datatrove pins xxhash<4 in an
    extra), so the run encodes them to UTF-8 first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from functools import partial

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from chatforge.config import load_spec  # noqa: E402
from chatforge.data import augment, dedup, filters, formats, normalize, pii, sources, split, toxicity  # noqa: E402
from chatforge.data.schema import mark_dropped  # noqa: E402
from chatforge.safety.scorers import build_scorer  # noqa: E402
from helpers.corpus import PII_SNIPPETS, write_sharegpt_jsonl  # noqa: E402

SPEC = os.path.join(ROOT, "pipelines", "curate.yaml")


def run_ray(
    corpus: str, output: str, num_cpus: int, pin_cores: set[int] | None = None, sample_memory: bool = False
) -> dict:
    """`chatforge curate` in a fresh process; returns the manifest, wall time with start-up, and (``sample_memory``)
    peak PSS.

    ``pin_cores``: confine the process and everything it starts (Ray's raylet, GCS, workers inherit the affinity)
    to these cores, so that a ``ray.num_cpus=1`` run really has one core. Timed runs do not sample memory: reading
    ~30 processes' PSS four times a second takes CPU, which a 2-core run pays for and a run pinned to one core
    does not (the sampler runs on the free core), so sampling would skew the speed-up."""
    cmd = [
        sys.executable,
        "-m",
        "chatforge.cli",
        "curate",
        SPEC,
        "--input",
        corpus,
        "--format",
        "sharegpt",
        "--output",
        output,
        "--json",
        f"ray.num_cpus={num_cpus}",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    started = time.perf_counter()
    pin = (lambda: os.sched_setaffinity(0, pin_cores)) if pin_cores else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, preexec_fn=pin)
    peak = PeakMemory(proc.pid) if sample_memory else None
    stdout, stderr = proc.communicate()
    if peak:
        peak.stop()
    if proc.returncode:
        raise SystemExit(f"chatforge curate failed ({proc.returncode}) at num_cpus={num_cpus}:\n{stderr[-4000:]}")
    # The manifest is the last JSON line; a library may print after it (the line is looked for, not assumed).
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"chatforge curate printed no manifest at num_cpus={num_cpus}:\n{stdout[-2000:]}")
    manifest = json.loads(lines[-1])
    return {
        "manifest": manifest,
        "wall_s": time.perf_counter() - started,
        "peak_pss_mb": peak.peak / 2**20 if peak else None,
        "peak_by_process_mb": peak.peak_by_process if peak else None,
    }


def paired_speedups(corpus: str, output: str, pairs: int, log) -> tuple[list[dict], list[float | None]]:
    """``pairs`` times a 2-CPU run and a 1-CPU run pinned to one core, back to back; their ratio each time.

    One pair's ratio moves by ±15% on these machines (their speed drifts within minutes), so the headline speed-up
    is the median of the pairs' ratios, and the order alternates (2 then 1 CPU, 1 then 2, ...) so that a drift
    across the run does not favour either side."""
    two_cpu_runs, ratios = [], []
    for pair in range(pairs):
        runs = {}
        for cpus in (1, 2) if pair % 2 else (2, 1):
            where = os.path.join(output, f"ray{cpus}-{pair}")
            runs[cpus] = run_one_cpu(corpus, where, {0}, log) if cpus == 1 else run_ray(corpus, where, 2)
        run = runs[2]
        log(f"ray 2 cpus: {run['manifest']['wall_seconds']:.1f}s pipeline, {run['wall_s']:.1f}s with start-up")
        two_cpu_runs.append(run)
        ratios.append(speedup_of(runs[1], run))
    return two_cpu_runs, ratios


def run_one_cpu(corpus: str, output: str, pin_cores: set[int] | None, log) -> dict | None:
    """The pipeline at ``ray.num_cpus=1`` (pinned to ``pin_cores`` if given); None if it failed (logged, so the
    other figures still come out)."""
    try:
        run = run_ray(corpus, output, 1, pin_cores=pin_cores)
    except SystemExit as failure:
        log(str(failure))
        return None
    where = f"pinned to cores {sorted(pin_cores)}" if pin_cores else "all cores"
    log(f"ray 1 cpu, {where}: {run['manifest']['wall_seconds']:.1f}s pipeline")
    return run


def speedup_of(one_cpu: dict | None, two_cpus: dict) -> float | None:
    if one_cpu is None:
        return None
    return round(one_cpu["manifest"]["wall_seconds"] / two_cpus["manifest"]["wall_seconds"], 3)


class PeakMemory:
    """Samples the proportional set size of a process and all its descendants (PSS counts shared pages once)."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.peak = 0
        self.peak_by_process: dict[str, float] = {}  # MB per process title (e.g. "gcs_server", "ray::IDLE") at the peak
        self._root = psutil.Process(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._done.is_set():
            total, by_process = 0, {}
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in procs:
                with contextlib.suppress(psutil.Error):  # a worker may exit between listing and reading
                    pss = proc.memory_full_info().pss
                    total += pss
                    title = (proc.cmdline() or [proc.name()])[0].rsplit("/", 1)[-1][:40]
                    by_process[title] = by_process.get(title, 0) + pss
            if total > self.peak:
                self.peak = total
                self.peak_by_process = {
                    k: round(v / 2**20, 1) for k, v in sorted(by_process.items(), key=lambda kv: -kv[1])
                }
            self._done.wait(interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def single_process(corpus: str, output: str) -> dict:
    """The same per-batch functions in one process, for the baseline."""
    spec = load_spec(SPEC).curate
    scorer = build_scorer(spec.toxicity)
    started = time.perf_counter()
    records = []
    size = os.path.getsize(corpus)
    raw = [
        sources._raw_row("corpus", "sharegpt", f"{corpus}@byte={o}", t, e)
        for o, t, e in sources.iter_jsonl_range(corpus, 0, size, spec.read)
    ]
    steps_before_dedup = [
        partial(formats.parse_raw_records, role_map={}, raw_keep_bytes=spec.read.raw_keep_bytes),
        partial(normalize.normalize_records, spec=spec.normalize),
        partial(filters.filter_records, spec=spec.filters),
        partial(pii.scrub_records, spec=spec.pii),
    ]
    for start in range(0, len(raw), spec.read.block_rows):
        batch = raw[start : start + spec.read.block_rows]
        for fn in steps_before_dedup:
            batch = fn(batch)
        records += batch
    in_memory_dedup(records, spec.dedup)
    out = []
    for start in range(0, len(records), spec.toxicity.batch_size):
        batch = toxicity.score_records(records[start : start + spec.toxicity.batch_size], scorer, spec.toxicity)
        batch = augment.augment_records(batch, spec.augment)
        out += split.split_records(batch, spec.split)
    by_split = defaultdict(list)
    for record in out:
        by_split[record["split"] or "dropped"].append(record)
    os.makedirs(output, exist_ok=True)
    for name, rows in by_split.items():
        rows = [{k: v for k, v in r.items() if k != "_stage_seconds"} for r in rows]
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(output, f"{name}.parquet"))
    seconds = time.perf_counter() - started
    dropped = Counter(r["drop_reason"] for r in out if r["drop_reason"] is not None)
    return {"seconds": seconds, "kept": len(out) - dropped.total(), "dropped": dict(dropped), "input_records": len(raw)}


def in_memory_dedup(records: list[dict], spec) -> None:
    """Exact then near dedup with the step's own hashing, MinHash and banding functions, grouped in memory."""
    live = [r for r in records if r["drop_reason"] is None]
    first_by_hash: dict[str, dict] = {}
    for record in sorted(live, key=lambda r: r["id"]):
        key = dedup.exact_key(record["messages"])
        if key in first_by_hash:
            record["dup_of"] = first_by_hash[key]["id"]
            mark_dropped(record, dedup.EXACT_REASON)
        else:
            first_by_hash[key] = record
    reps = sorted(first_by_hash.values(), key=lambda r: r["id"])
    signatures = dedup.minhash_signatures(
        [dedup.normalized_conversation(r["messages"]) for r in reps], spec.num_perm, spec.shingle_words
    )
    # All bands' rows as one block through the step's own band_rows and verified_band_edges (as dedup in one task
    # runs them): verified_band_edges verifies candidates on the sketches and links each row to the smallest row of
    # its group.
    representatives = pa.table(
        {
            dedup.ROW_KEY: [r["id"] for r in reps],
            dedup.SIGNATURE: pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel()), spec.num_perm),
        }
    )
    edges = dedup.verified_band_edges(dedup.band_rows(representatives, spec.bands), spec.threshold, spec.num_perm)
    dup_of = dict(zip(edges["src"].to_pylist(), edges["dst"].to_pylist(), strict=True))
    for record in reps:
        if record["id"] in dup_of:
            record["dup_of"] = dup_of[record["id"]]
            mark_dropped(record, dedup.NEAR_REASON)


# ---------------------------------------------------------------------------------------------------------------
# --peer datatrove: the same corpus through datatrove 0.10.1, end to end, beside `chatforge curate`.

# The values PII_SNIPPETS seeds, one pattern per kind, in PII_SNIPPETS' order (checked against it at start).
SEEDED_PII = {
    "email": re.compile(r"jane\.doe\d+@example\.com"),
    "phone": re.compile(r"\+1 415-555-\d{4}"),
    "card": re.compile(r"4111 1111 1111 1111"),
    "iban": re.compile(r"DE89 3704 0044 0532 0130 00"),
    "ip": re.compile(r"\b10\.0\.\d{1,3}\.\d{1,3}\b"),
    "secret": re.compile(r"sk-proj-\d{4}abcdefghijklmnopqrstuvwx"),
}

PEER_WORKERS = 2
# chatforge's dedup settings (pipelines/curate.yaml: num_perm 128 in 16 bands, 5-word shingles) as datatrove's
# MinhashConfig: 16 buckets of 8 hashes, 5-grams. Its LSH threshold, (1/16)^(1/8) = 0.71, is chatforge's 0.7;
# datatrove takes every band collision as a duplicate, chatforge verifies candidates on the sketches.
DATATROVE_MINHASH = {"n_grams": 5, "num_buckets": 16, "hashes_per_bucket": 8}
# Emails and IPs are all its PII formatter knows. Private addresses too: its default replaces only public ones, and
# the seeded addresses are 10.0.x.x.
DATATROVE_PII = {"remove_emails": True, "remove_ips": True, "only_remove_public_ips": False}

# The datatrove run, written to a file and run in a fresh interpreter (so that its imports count as chatforge's do,
# and none of this script's: chatforge, pyarrow). argv[1]: a JSON object of paths and settings. Prints one JSON line.
DATATROVE_PROGRAM = r'''
import json
import sys
import time

STARTED = time.perf_counter()

import xxhash
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.formatters.pii import PIIFormatter
from datatrove.utils.word_tokenizers import WordTokenizer

try:  # datatrove's JSONL reader and writer need orjson (its `io` extra)
    import orjson  # noqa: F401

    from datatrove.pipeline.readers.jsonl import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    JSON_LIBRARY = "orjson"
except ImportError:  # the same reader and writer on the standard library's json
    from datatrove.pipeline.readers.base import BaseDiskReader
    from datatrove.pipeline.writers.disk_base import DiskWriter

    JSON_LIBRARY = "json"

    class JsonlReader(BaseDiskReader):
        name = "Jsonl (json)"

        def __init__(self, data_folder, compression="infer", **kwargs):
            super().__init__(data_folder, **kwargs)
            self.compression = compression

        def read_file(self, filepath):
            with self.data_folder.open(filepath, "r", compression=self.compression) as f:
                for li, line in enumerate(f):
                    with self.track_time():
                        document = self.get_document_from_dict(json.loads(line), filepath, li)
                    if document:
                        yield document

    class JsonlWriter(DiskWriter):
        default_output_filename = "${rank}.jsonl"
        name = "Jsonl (json)"

        def __init__(self, output_folder, compression=None, **kwargs):
            super().__init__(output_folder, compression=compression, mode="wt", **kwargs)

        def _write(self, document, file_handler, _filename):
            file_handler.write(json.dumps(document, ensure_ascii=False) + "\n")


class Signatures(MinhashDedupSignature):
    """MinhashDedupSignature hashing shingles with xxhash64 as datatrove means to: it passes str, which xxhash 4 (the
    version chatforge installs; datatrove's `processing` extra pins xxhash<4) refuses, so encode them first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.hash_config.hash_fc == "xxhash" and self.config.hash_config.precision == 64:
            self._hash_func = xxhash64_utf8


def xxhash64_utf8(text):
    return xxhash.xxh64_intdigest(text.encode("utf-8"))


class SplitTokenizer(WordTokenizer):
    """Words split at whitespace. MinHash tokenizes text it has simplified (lower case, no punctuation); datatrove's
    English tokenizer is spaCy's, which is not installed."""

    def word_tokenize(self, text):
        return text.split()

    def sent_tokenize(self, text):
        return [text]

    def span_tokenize(self, text):
        return [(0, len(text))]


def sharegpt_document(self, data, path, id_in_file):
    """A ShareGPT record as a Document: its turns' text, one turn per line; its id kept."""
    turns = data.get("conversations") or []
    return {
        "text": "\n".join(turn.get("value") or "" for turn in turns),
        "id": data.get("id") or f"{path}/{id_in_file}",
        "metadata": {},
    }


def main():
    args = json.loads(sys.argv[1])
    work, workers = args["work"], args["workers"]
    config = MinhashConfig(**args["minhash"])

    def reader():
        return JsonlReader(args["input"], adapter=sharegpt_document, add_file_path=False)

    def executor(name, pipeline, tasks):
        return LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=f"{work}/logs/{name}"
        )

    stages = [
        ("signatures", executor(
            "signatures",
            [reader(), Signatures(f"{work}/signatures", config=config, language=SplitTokenizer())],
            args["shards"],
        )),
        ("buckets", executor(
            "buckets",
            [MinhashDedupBuckets(f"{work}/signatures", f"{work}/buckets", config=config)],
            config.num_buckets,
        )),
        ("cluster", executor(
            "cluster", [MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config)], 1
        )),
        ("filter_pii_write", executor(
            "filter_pii_write",
            [
                reader(),
                MinhashDedupFilter(f"{work}/remove"),
                PIIFormatter(**args["pii"]),
                JsonlWriter(args["output"], compression=None),
            ],
            args["shards"],
        )),
    ]
    seconds = {"imports": round(time.perf_counter() - STARTED, 3)}
    for name, stage in stages:
        began = time.perf_counter()
        stage.run()
        seconds[name] = round(time.perf_counter() - began, 3)
    print(json.dumps({"json_library": JSON_LIBRARY, "stage_seconds": seconds}))


if __name__ == "__main__":
    main()
'''


def check_seeded_pii_patterns() -> None:
    """Each of PII_SNIPPETS matches its own pattern and no other (so the counts follow the corpus helper)."""
    if len(PII_SNIPPETS) != len(SEEDED_PII):
        raise SystemExit(f"PII_SNIPPETS has {len(PII_SNIPPETS)} kinds, SEEDED_PII {len(SEEDED_PII)}: update SEEDED_PII")
    for kind, snippet in zip(SEEDED_PII, PII_SNIPPETS):
        value = snippet.format(n=42, m=7)
        matched = [name for name, pattern in SEEDED_PII.items() if pattern.search(value)]
        if matched != [kind]:
            raise SystemExit(f"seeded PII snippet {snippet!r} matches {matched}, not [{kind!r}]: update SEEDED_PII")


def count_seeded_pii(texts: Iterable[str]) -> dict[str, int]:
    """Occurrences of the seeded PII values in ``texts``, by kind."""
    counts = dict.fromkeys(SEEDED_PII, 0)
    for text in texts:
        for kind, pattern in SEEDED_PII.items():
            counts[kind] += len(pattern.findall(text))
    return counts


def jsonl_lines(paths: Iterable[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            yield from f


def chatforge_kept_texts(output: str) -> Iterator[str]:
    """Every kept row's turns and meta (``OUTPUT/data/<split>/*.parquet``; dropped rows are not output)."""
    for root, _, names in sorted(os.walk(os.path.join(output, "data"))):
        for name in sorted(n for n in names if n.endswith(".parquet")):
            table = pq.read_table(os.path.join(root, name), columns=["messages", "meta"])
            for messages, meta in zip(table["messages"].to_pylist(), table["meta"].to_pylist()):
                yield "\n".join(m["content"] or "" for m in messages or []) + "\n" + (meta or "")


def datatrove_kept_texts(paths: list[str]) -> Iterator[str]:
    """Every written document's text and metadata."""
    for line in jsonl_lines(paths):
        document = json.loads(line)
        yield document.get("text", "") + "\n" + json.dumps(document.get("metadata") or {})


def split_jsonl(path: str, folder: str, shards: int) -> None:
    """``path`` as ``shards`` files of consecutive lines: datatrove's readers parallelize over files, one or more
    per task, so one file would leave all but one task idle."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    os.makedirs(folder)
    per_shard = -(-len(lines) // shards)
    for shard in range(shards):
        with open(os.path.join(folder, f"{shard:05d}.jsonl"), "w", encoding="utf-8") as out:
            out.writelines(lines[shard * per_shard : (shard + 1) * per_shard])


def run_datatrove(program: str, shards_dir: str, output: str, work: str) -> dict:
    """The datatrove pipeline in a fresh interpreter; its wall time from start to exit, and its stage times."""
    args = {
        "input": shards_dir,
        "output": output,
        "work": work,
        "workers": PEER_WORKERS,
        "shards": PEER_WORKERS,
        "minhash": DATATROVE_MINHASH,
        "pii": DATATROVE_PII,
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, program, json.dumps(args)], cwd=work, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"the datatrove run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"the datatrove run printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"wall_s": wall, **json.loads(lines[-1])}


def peer_size(label: str, n: int, seed: int, tmp: str, program: str, log) -> dict:
    """One size: the corpus, `chatforge curate` at ray.num_cpus=2 and the datatrove run on it, the seeded PII left
    in each one's output."""
    where = os.path.join(tmp, label)
    os.makedirs(where)
    corpus = os.path.join(where, "corpus.jsonl")
    write_sharegpt_jsonl(corpus, n, seed=seed, pii_every=10, near_every=25)
    shards_dir = os.path.join(where, "shards")
    split_jsonl(corpus, shards_dir, PEER_WORKERS)
    seeded = count_seeded_pii(jsonl_lines([corpus]))
    input_mib = round(os.path.getsize(corpus) / 2**20, 1)
    log(f"{label}: {n} conversations, {input_mib} MiB, seeded PII {seeded}")

    chatforge = run_ray(corpus, os.path.join(where, "chatforge"), 2)
    manifest = chatforge["manifest"]
    chatforge_left = count_seeded_pii(chatforge_kept_texts(os.path.join(where, "chatforge")))
    log(f"{label} chatforge: {chatforge['wall_s']:.1f}s end to end, {manifest['kept']} kept, PII left {chatforge_left}")

    dt_work = os.path.join(where, "datatrove-work")
    dt_output = os.path.join(where, "datatrove")
    os.makedirs(dt_work)
    datatrove = run_datatrove(program, shards_dir, dt_output, dt_work)
    written = sorted(os.path.join(dt_output, f) for f in os.listdir(dt_output) if f.endswith(".jsonl"))
    datatrove_kept = sum(1 for _ in jsonl_lines(written))
    datatrove_left = count_seeded_pii(datatrove_kept_texts(written))
    log(f"{label} datatrove: {datatrove['wall_s']:.1f}s end to end, {datatrove_kept} kept, PII left {datatrove_left}")
    shutil.rmtree(where)
    return {
        "conversations": n,
        "input_mib": input_mib,
        "chatforge_wall_s": round(chatforge["wall_s"], 2),
        "datatrove_wall_s": round(datatrove["wall_s"], 2),
        "ratio": round(chatforge["wall_s"] / datatrove["wall_s"], 3),
        "chatforge_pipeline_s": manifest["wall_seconds"],
        "datatrove_stage_s": datatrove["stage_seconds"],
        "kept_chatforge": manifest["kept"],
        "kept_datatrove": datatrove_kept,
        "dropped_chatforge": manifest["dropped"],
        "dropped_datatrove": {"minhash_duplicate": n - datatrove_kept},
        "pii_seeded": seeded,
        "pii_left_chatforge": chatforge_left,
        "pii_left_datatrove": datatrove_left,
        "datatrove_json_library": datatrove["json_library"],
    }


def peer_comparison(n: int, log) -> dict:
    check_seeded_pii_patterns()
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="chatforge-peer-") as tmp:
        program = os.path.join(tmp, "datatrove_peer.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(DATATROVE_PROGRAM)
        for label, size, seed in (("1x", n, 1), ("4x", 4 * n, 2)):
            sizes[label] = peer_size(label, size, seed, tmp, program, log)
    ratio_1x, ratio_4x = sizes["1x"]["ratio"], sizes["4x"]["ratio"]
    chatforge_left = sum(sum(s["pii_left_chatforge"].values()) for s in sizes.values())
    return {
        "benchmark": "curate_peer",
        "peer": "datatrove",
        "peer_version": importlib.metadata.version("datatrove"),
        "conversations": n,
        "ratio_1x": ratio_1x,
        "ratio_4x": ratio_4x,
        "pii_left_chatforge_total": chatforge_left,
        "pii_left_datatrove_total": sum(sum(s["pii_left_datatrove"].values()) for s in sizes.values()),
        # reported, not asserted: chatforge's end-to-end wall <= datatrove's at 1x, <= 0.6x at 4x, no seeded PII left
        "targets": {"ratio_1x_max": 1.0, "ratio_4x_max": 0.6, "pii_left_chatforge": 0},
        "targets_met": {
            "ratio_1x": ratio_1x <= 1.0,
            "ratio_4x": ratio_4x <= 0.6,
            "pii_left_chatforge": chatforge_left == 0,
        },
        "sizes": sizes,
        "chatforge_settings": {"spec": os.path.relpath(SPEC, ROOT), "ray.num_cpus": 2},
        "datatrove_settings": {
            "tasks": PEER_WORKERS,
            "workers": PEER_WORKERS,
            "input_files": PEER_WORKERS,
            "minhash": DATATROVE_MINHASH,
            "minhash_buckets_tasks": DATATROVE_MINHASH["num_buckets"],
            "tokenizer": "whitespace split (SplitTokenizer)",
            "shingle_hash": "xxhash64 of the UTF-8 bytes (datatrove passes str, which xxhash 4 refuses)",
            "pii": DATATROVE_PII,
            "order": "read -> signatures -> buckets -> cluster; read -> filter -> PII -> write (JSONL, uncompressed)",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30_000, help="conversations in the 1x corpus")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 4x memory run")
    parser.add_argument("--pairs", type=int, default=5, help="2-CPU + pinned 1-CPU run pairs for the 1x speed-up")
    parser.add_argument(
        "--peer",
        choices=["datatrove"],
        help="run only the peer comparison: chatforge vs datatrove end to end at 1x and 4x, and the seeded PII left",
    )
    args = parser.parse_args()
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    if args.peer:
        print(json.dumps(peer_comparison(args.n, log)))
        return

    with tempfile.TemporaryDirectory(prefix="chatforge-bench-") as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        write_sharegpt_jsonl(corpus, args.n, seed=1, pii_every=10, near_every=25)
        log(f"corpus: {args.n} conversations, {os.path.getsize(corpus) / 2**20:.1f} MiB")

        base = single_process(corpus, os.path.join(tmp, "single"))
        log(f"single process: {base['seconds']:.1f}s")
        # One CPU for Ray's scheduler is not one core: Ray's own processes (driver, raylet, GCS) would still run on
        # the second core for free. The speed-up compares 2 cores with 1 core (the run pinned to it); the unpinned
        # num_cpus=1 run is reported beside it.
        two_cpu_runs, ratios = paired_speedups(corpus, tmp, args.pairs, log)
        ray2 = sorted(two_cpu_runs, key=lambda run: run["manifest"]["wall_seconds"])[len(two_cpu_runs) // 2]
        measured = [ratio for ratio in ratios if ratio is not None]
        speedup = round(float(np.median(measured)), 3) if len(measured) == len(ratios) else None
        speedup_unpinned = speedup_of(run_one_cpu(corpus, os.path.join(tmp, "ray1u"), None, log), ray2)
        result = {
            "benchmark": "curate",
            "conversations": args.n,
            "input_mib": round(os.path.getsize(corpus) / 2**20, 1),
            "ray_conversations_per_s": round(args.n / ray2["manifest"]["wall_seconds"], 1),
            "single_process_conversations_per_s": round(args.n / base["seconds"], 1),
            "ray_vs_single_process": round(base["seconds"] / ray2["manifest"]["wall_seconds"], 3),
            "ray_startup_s": round(ray2["wall_s"] - ray2["manifest"]["wall_seconds"], 1),
            "speedup_2cpu_vs_1cpu": speedup,
            "speedup_2cpu_vs_1cpu_pairs": ratios,
            "ray_2cpu_pipeline_s_runs": [run["manifest"]["wall_seconds"] for run in two_cpu_runs],
            "speedup_2cpu_vs_num_cpus_1_unpinned": speedup_unpinned,
            "ray_1cpu_error": None if speedup else "chatforge curate failed at ray.num_cpus=1 (see stderr)",
            "kept_ray": ray2["manifest"]["kept"],
            "kept_single_process": base["kept"],
            "dropped_ray": ray2["manifest"]["dropped"],
            "dropped_single_process": base["dropped"],
            "stages_cpu_s": {s["name"]: s["seconds"] for s in ray2["manifest"]["stages"]},
        }
        if not args.skip_memory:
            big = os.path.join(tmp, "corpus4x.jsonl")
            write_sharegpt_jsonl(big, 4 * args.n, seed=2, pii_every=10, near_every=25)
            mem1 = run_ray(corpus, os.path.join(tmp, "mem1x"), 2, sample_memory=True)
            mem4 = run_ray(big, os.path.join(tmp, "mem4x"), 2, sample_memory=True)
            log(f"peak memory: {mem1['peak_pss_mb']:.0f} MB at 1x, {mem4['peak_pss_mb']:.0f} MB at 4x")
            result["peak_pss_mb_1x"] = round(mem1["peak_pss_mb"], 1)
            result["peak_pss_mb_4x"] = round(mem4["peak_pss_mb"], 1)
            result["peak_memory_growth_4x"] = round(mem4["peak_pss_mb"] / mem1["peak_pss_mb"], 3)
            result["peak_by_process_mb_1x"] = mem1["peak_by_process_mb"]
            result["peak_by_process_mb_4x"] = mem4["peak_by_process_mb"]
            ray4 = run_ray(big, os.path.join(tmp, "ray4x"), 2)
            log(f"ray 4x: {ray4['manifest']['wall_seconds']:.1f}s pipeline")
            result["ray_conversations_per_s_4x"] = round(4 * args.n / ray4["manifest"]["wall_seconds"], 1)
            # The speed-up again on the 4x input, where the fixed costs (actor starts, the driver's scheduling, the
            # shuffles' start-up) weigh less against the per-record work.
            result["speedup_2cpu_vs_1cpu_4x"] = speedup_of(
                run_one_cpu(big, os.path.join(tmp, "ray4x1"), {0}, log), ray4
            )
    print(json.dumps(result))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
