"""Ray Tune's overhead: four trials of `chatforge tune` vs the same four configs run one after another.

    .venv/bin/python benchmarks/tune_overhead.py --json          # ~6 minutes on 2 idle cores
    .venv/bin/python benchmarks/tune_overhead.py --data DIR      # another curation output's data/

In one run, on the same curated data (default: the quickstart's, which `make demo` writes):
  (a) `chatforge tune pipelines/tune.yaml` with the FIFO scheduler (no trial stopped early, so both sides do the same
      training steps): four trials, two at a time, each one Ray Train worker of 0.9 CPU;
  (b) the four configs that search drew (read back from its trials.csv), each as its own `chatforge train` process
      with the same spec and the trial's values, one after another;
  (c) the same search with ASHA, as users run it: what early stopping saves.
Wall times are of the whole command (Ray's start and the one tokenize-and-pack pass included). ``speedup`` is
(b) / (a): above 1 when running two trials at a time more than pays for Tune's own cost. ``asha_saving`` is
1 - (c) / (a).

Prints progress on stderr and the JSON result on stdout: indented, or with `--json` as one (the last) line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "pipelines", "tune.yaml")
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
COMMON = ["tracking.enabled=false"]


def say(message: str) -> None:
    print(f"[tune_overhead] {message}", file=sys.stderr, flush=True)


def timed(args: list[str]) -> float:
    """Run ``chatforge ARGS`` to the end; its wall seconds (a failure stops the benchmark with its output)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "chatforge.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"chatforge {' '.join(args[:2])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def trial_configs(output: str) -> list[dict[str, str]]:
    """Each trial's values as `key=value` overrides, read back from the search's trials.csv."""
    with open(os.path.join(output, "trials.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    skip = {"trial_id", "eval_loss", "steps", "status", "error"}
    return [{k: v for k, v in row.items() if k not in skip} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "runs", "quickstart", "curated", "data"))
    parser.add_argument("--json", action="store_true", help="print the result as one line")
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        sys.exit(f"no curated data at {args.data}: run `make demo` (or `chatforge curate`) first, or pass --data DIR")

    with tempfile.TemporaryDirectory(prefix="tune-overhead-") as tmp:
        fifo_out = os.path.join(tmp, "fifo")
        say("(a) chatforge tune, FIFO: 4 trials, 2 at a time")
        tune_s = timed(["tune", SPEC, "--data", args.data, "--output", fifo_out, "tune.scheduler=fifo", *COMMON])
        configs = trial_configs(fifo_out)
        train_s = []
        for number, config in enumerate(configs, start=1):
            say(f"(b) chatforge train {number}/{len(configs)}: {config}")
            overrides = [f"{key}={value}" for key, value in config.items()]
            out = os.path.join(tmp, f"train{number}")
            train_s.append(timed(["train", SPEC, "--data", args.data, "--output", out, *overrides, *COMMON]))
        say("(c) chatforge tune, ASHA")
        asha_out = os.path.join(tmp, "asha")
        asha_s = timed(["tune", SPEC, "--data", args.data, "--output", asha_out, *COMMON])
        with open(os.path.join(asha_out, "trials.csv"), encoding="utf-8") as f:
            asha_statuses = [row["status"] for row in csv.DictReader(f)]

    result = {
        "trials": len(configs),
        "tune_fifo_s": round(tune_s, 1),
        "sequential_train_s": round(sum(train_s), 1),
        "train_each_s": [round(s, 1) for s in train_s],
        "speedup": round(sum(train_s) / tune_s, 3),
        "tune_asha_s": round(asha_s, 1),
        "asha_stopped": asha_statuses.count("stopped"),
        "asha_saving": round(1 - asha_s / tune_s, 3),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
