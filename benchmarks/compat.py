"""What each performance entry of `chatforge.compat` buys: the same work with the entry on and off, interleaved.

    .venv/bin/python benchmarks/compat.py --json          # ~8 minutes on 2 cores; --runs (3) per configuration

Every run is a fresh process with its own local Ray; an entry is turned off with CHATFORGE_COMPAT_DISABLE.
  curate   `local_ray_env`: `chatforge curate pipelines/quickstart.yaml` without its toxicity step (the chitchat
           corpus; the scorer's CPU time would hide the scheduling), the manifest's wall_seconds.
  train    `local_ray_env`: `chatforge train` of the scratch GPT (tests/helpers' tiny settings, 20 steps), the
           command's wall.
The other entries are there for correctness (docs/compat.md says what each prevents). Prints a JSON object, the
median and range of each configuration (with ``--json``, one line, last).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
CLI = os.path.join(os.path.dirname(sys.executable), "chatforge")
BASE_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}

# Each probe: the entries whose on/off it compares.
PROBES = {
    "curate": ["local_ray_env"],
    "train": ["local_ray_env"],
}


def say(message: str) -> None:
    print(f"[compat] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], disable: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **BASE_ENV, "CHATFORGE_COMPAT_DISABLE": disable, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}… failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return done


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def measure(probe: str, disable: str, workdir: str, data: str) -> dict:
    out = tempfile.mkdtemp(dir=workdir)
    if probe == "curate":
        steps = "curate.steps=[normalize,filters,pii,dedup,augment,split]"
        done = run([CLI, "curate", "pipelines/quickstart.yaml", steps, "--output", out, "--json"], disable)
        return {"wall_s": last_json(done.stdout)["wall_seconds"]}
    from helpers.train_data import TINY_TRAINING

    start = time.perf_counter()
    run(
        [
            CLI,
            "train",
            "pipelines/quickstart.yaml",
            "--data",
            data,
            "--output",
            out,
            *TINY_TRAINING,
            "train.max_steps=20",
        ],
        disable,
    )
    return {"wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration, interleaved")
    parser.add_argument("--probes", default=",".join(PROBES), help="comma-separated: " + ",".join(PROBES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from pathlib import Path

    from helpers.train_data import write_curated

    result: dict = {"runs": args.runs, "date": time.strftime("%Y-%m-%d"), "probes": {}}
    with tempfile.TemporaryDirectory() as workdir:
        data = str(write_curated(Path(workdir) / "curated"))
        for probe in args.probes.split(","):
            configs = {"on": "", **{f"off:{entry}": entry for entry in PROBES[probe]}}
            samples: dict[str, list[dict]] = {name: [] for name in configs}
            for i in range(args.runs):
                for name, disable in configs.items():
                    samples[name].append(measure(probe, disable, workdir, data))
                    say(f"{probe} {name} run {i + 1}/{args.runs}: {samples[name][-1]}")
            figures = {}
            for name, runs in samples.items():
                figures[name] = {
                    key: {
                        "median": round(statistics.median(r[key] for r in runs), 3),
                        "min": round(min(r[key] for r in runs), 3),
                        "max": round(max(r[key] for r in runs), 3),
                    }
                    for key in runs[0]
                }
            result["probes"][probe] = figures
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
