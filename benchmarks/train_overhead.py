"""Ray Train overhead: chatforge's training on Ray Train vs the same loop under plain `torchrun`, and ZeRO memory.

    .venv/bin/python benchmarks/train_overhead.py --json      # expect 45-60 minutes on 2 idle cores (3 pairs)
    .venv/bin/python benchmarks/train_overhead.py --steps 6 --warmup 2 --log-every 2 --n-layer 2 --n-embd 128 \
        --n-head 2 --data runs/quickstart/curated/data         # a smoke run (~4 minutes): checks, measures nothing

Same model, data, ZeRO-2 config, 2 workers and step count, in ``--pairs`` interleaved pairs (default 3; the
medians and ranges of ``ratio``, steady-state tokens/s Ray over torchrun, and ``wall_ratio``, torchrun's wall time
over Ray's, are reported, with the median pair's details and Ray's fixed cost by phase, ``ray_fixed_cost_s``):
  (a) `chatforge train` on a spec this script writes (a GPT-2 of n_layer 6, n_embd 384, 256-token rows, 8 rows per
      worker per step, ZeRO-2), through Ray Train + Ray Data; steady-state tokens/s are read from its
      OUTPUT/metrics.jsonl, where the loop logs one row every ``--log-every`` optimizer steps;
  (b) `torchrun --nproc_per_node 2 benchmarks/_torchrun_baseline.py` on the same spec file: the same tokenizer
      (the one run (a) trained and saved), `build_model`, `TokenizeSamples`/`PackRows`, `deepspeed_config`,
      `lr_multiplier`, `model_inputs` and the same micro-step loop, timed the same way.
Both run on the CPU accelerator (`DS_ACCELERATOR=cpu`), gloo, fp32, torch AdamW, one thread per worker
(`OMP_NUM_THREADS=1`, `scaling.cpus_per_worker: 1`). Tokens are non-pad tokens summed over workers; a window's
tokens/s is its tokens over its wall time; the steady state is the mean over the windows after ``--warmup`` steps
(so start-up, compilation and the first data fetches are left out, while each window still carries its share of
logging and of `ray.train.report`). A step of the default model (13.8M parameters, 2048 tokens per worker) is
~2x10^11 FLOPs per worker, seconds on one core, so compute, not logging or reporting (one of each per 10 steps),
dominates. Wall times are of the whole command, start-up included. ``packing_efficiency`` is chatforge's (non-pad / all tokens of the packed train rows).

Memory: for ZeRO 0 and 3 on the same model and 2 workers, the arithmetic of `zero_memory_per_worker` (fp32) next
to what each rank holds after one step of a `torchrun` run (`_torchrun_baseline.py --memory-stage`): parameter
storage, gradients, AdamW state and fp32 master weights, in bytes (activations and communication buffers excluded).

Prints progress on stderr and the JSON result on stdout: indented, or with `--json` as one (the last) line.
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

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "benchmarks", "_torchrun_baseline.py")
QUICKSTART = os.path.join(ROOT, "pipelines", "quickstart.yaml")
ENV = {
    **os.environ,
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}
MEMORY_STAGES = (0, 3)


def say(message: str) -> None:
    print(f"[train_overhead] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], log_path: str) -> float:
    """Run ``cmd`` with its output in ``log_path``; its wall time, or exit with the log's tail on failure."""
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT).returncode
    wall = time.perf_counter() - started
    if code:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            tail = log.read()[-4000:]
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({code}); end of {log_path}:\n{tail}")
    return wall


def bench_spec(args, output: str) -> dict:
    """The spec both runs use; eval once at the end, one checkpoint (the final one), no fault tolerance."""
    return {
        "name": "bench-train-overhead",
        "ray": {"num_cpus": args.workers},
        "model": {
            "name_or_path": "scratch",
            "n_layer": args.n_layer,
            "n_embd": args.n_embd,
            "n_head": args.n_head,
            "max_length": args.max_length,
            "vocab_size": 8000,
        },
        "train": {
            "output": output,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "grad_accum": 1,
            "lr": 3e-4,
            "warmup_steps": args.warmup,
            "log_every": args.log_every,
            "eval_every": args.steps,
            "eval_batches": 4,
            "checkpoint_every": args.steps,
            "keep_checkpoints": 1,
        },
        "deepspeed": {"zero_stage": 2},
        "method": "full",
        "scaling": {"num_workers": args.workers, "use_gpu": False, "cpus_per_worker": 1, "max_failures": 0},
    }


def steady_tokens_per_s(rows: list[dict], warmup: int) -> float:
    steady = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row and row["step"] > warmup]
    if not steady:
        raise SystemExit(f"no logged window after {warmup} warm-up steps: raise --steps or lower --warmup")
    return sum(steady) / len(steady)


def fixed_cost(wall: float, training: dict, rows: list[dict], args) -> dict[str, float]:
    """Where a Ray run's wall time went besides its steps: the process and Ray's start (the command's wall less
    run_training's), the tokenizer and data preparation, the fit less its steps at the steady rate (worker group
    start, the first steps' warm-up, the final evaluation and checkpoint), and the export copy."""
    phases = training["phases"]
    step_s = [r["step_s"] for r in rows if "step_s" in r and r["step"] > args.warmup]
    if step_s:
        steady_step_s = sum(step_s) / len(step_s)
    else:  # windows log tokens/s: a step's time is its tokens over the rate
        tokens_per_step = args.batch_size * args.workers * args.max_length * training["data"]["packing_efficiency"]
        steady_step_s = tokens_per_step / steady_tokens_per_s(rows, args.warmup)
    steps_s = steady_step_s * args.steps
    return {
        "start_s": round(wall - training["wall_seconds"], 2),
        "prepare_s": round(phases["prepare_s"], 2),
        "fit_beyond_steps_s": round(phases["fit_s"] - steps_s, 2),
        "export_s": round(phases["export_s"], 2),
        "steps_at_steady_rate_s": round(steps_s, 2),
    }


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state")
    parser.add_argument("--log-every", type=int, default=10, help="steps per logged window (divides --warmup)")
    parser.add_argument("--data", help="a curated data/ dir; default: curate the chitchat corpus first")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per packed row")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per worker per step")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved Ray/torchrun pairs; medians are reported")
    parser.add_argument("--skip-memory", action="store_true", help="skip the ZeRO 0 vs 3 memory runs")
    parser.add_argument("--workdir", help="keep every output here (default: a temporary dir, removed)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line on stdout")
    args = parser.parse_args()
    if args.warmup % args.log_every or args.steps < args.warmup + args.log_every:
        parser.error("--log-every must divide --warmup, and --steps must leave one window after the warm-up")

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        result = benchmark(args, os.path.abspath(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="chatforge-train-bench-") as tmp:
            result = benchmark(args, tmp)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


def benchmark(args, tmp: str) -> dict:
    from chatforge.config import load_spec, resolved
    from chatforge.train.deepspeed import zero_memory_per_worker

    python = sys.executable
    if args.data:
        data = os.path.abspath(args.data)
    else:
        say("curating the chitchat corpus (pipelines/quickstart.yaml)")
        curated = os.path.join(tmp, "curated")
        run([python, "-m", "chatforge.cli", "curate", QUICKSTART, "--output", curated], os.path.join(tmp, "curate.log"))
        data = os.path.join(curated, "data")

    spec_path = os.path.join(tmp, "bench.yaml")
    ray_out, base_out = os.path.join(tmp, "ray"), os.path.join(tmp, "torchrun")
    with open(spec_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(bench_spec(args, ray_out), f, sort_keys=False)
    spec = load_spec(spec_path)  # fail here, not in a subprocess, if the spec is wrong

    torchrun = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.workers}", BASELINE]
    tokenizer = os.path.join(ray_out + "1", "model")
    pairs = []
    for number in range(1, args.pairs + 1):
        say(f"pair {number}/{args.pairs} (a) chatforge train on Ray Train: {args.workers} workers, {args.steps} steps")
        out = ray_out + str(number)
        ray_wall = run(
            [python, "-m", "chatforge.cli", "train", spec_path, "--data", data, "--output", out],
            os.path.join(tmp, f"ray{number}.log"),
        )
        training = read_json(os.path.join(out, "training.json"))
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            ray_rows = [json.loads(line) for line in f if line.strip()]
        ray_tps = steady_tokens_per_s(ray_rows, args.warmup)
        say(f"    {ray_tps:,.0f} tokens/s steady, {ray_wall:.1f}s wall")

        say(f"pair {number}/{args.pairs} (b) torchrun + DeepSpeed: {args.workers} processes, the same spec")
        base_result = os.path.join(tmp, f"torchrun{number}.json")
        base_wall = run(
            [
                *torchrun,
                *("--spec", spec_path, "--tokenizer", tokenizer, "--data", data, "--warmup", str(args.warmup)),
                *("--output", base_out + str(number), "--result", base_result),
            ],
            os.path.join(tmp, f"torchrun{number}.log"),
        )
        base = read_json(base_result)
        say(f"    {base['tokens_per_s']:,.0f} tokens/s steady, {base_wall:.1f}s wall")
        pairs.append(
            {
                "ratio": ray_tps / base["tokens_per_s"],
                "wall_ratio": base_wall / ray_wall,
                "ray_tokens_per_s": ray_tps,
                "torchrun_tokens_per_s": base["tokens_per_s"],
                "ray_wall_s": ray_wall,
                "torchrun_wall_s": base_wall,
                "fixed_cost_s": fixed_cost(ray_wall, training, ray_rows, args),
                "training": training,
                "ray_rows": ray_rows,
                "base": base,
            }
        )
    middle = sorted(pairs, key=lambda p: p["ratio"])[len(pairs) // 2]  # the median pair's details are reported
    training, ray_rows, base = middle["training"], middle["ray_rows"], middle["base"]

    params, trainable = training["final_metrics"]["total_params"], training["final_metrics"]["trainable_params"]
    memory = {}
    if not args.skip_memory:
        for stage in MEMORY_STAGES:
            say(f"memory: ZeRO-{stage}, one step under torchrun")
            path = os.path.join(tmp, f"memory{stage}.json")
            run(
                [
                    *torchrun,
                    *("--spec", spec_path, "--tokenizer", tokenizer),
                    *("--memory-stage", str(stage), "--result", path),
                ],
                os.path.join(tmp, f"memory{stage}.log"),
            )
            ranks = read_json(path)["per_rank"]
            measured = {key: max(r["measured_bytes"][key] for r in ranks) for key in ranks[0]["measured_bytes"]}
            memory[f"zero{stage}"] = {
                "arithmetic_bytes": {
                    k: int(v) for k, v in zero_memory_per_worker(params, trainable, stage, args.workers, False).items()
                },
                "measured_bytes": measured,
                "process_rss_mib": [round(r["process_rss_bytes"] / 2**20, 1) for r in ranks],
            }

    data_stats = training["data"]
    return {
        "benchmark": "train_overhead",
        "workers": args.workers,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "log_every": args.log_every,
        "model_params": params,
        "rows_per_step": args.batch_size * args.workers,
        "row_tokens": args.max_length,
        "pairs": len(pairs),
        "ratio": round(statistics.median(p["ratio"] for p in pairs), 4),
        "ratio_range": [round(min(p["ratio"] for p in pairs), 4), round(max(p["ratio"] for p in pairs), 4)],
        "wall_ratio": round(statistics.median(p["wall_ratio"] for p in pairs), 4),
        "wall_ratio_range": [
            round(min(p["wall_ratio"] for p in pairs), 4),
            round(max(p["wall_ratio"] for p in pairs), 4),
        ],
        "ray_tokens_per_s": round(middle["ray_tokens_per_s"], 1),
        "torchrun_tokens_per_s": round(middle["torchrun_tokens_per_s"], 1),
        "ray_wall_s": round(middle["ray_wall_s"], 2),
        "torchrun_wall_s": round(middle["torchrun_wall_s"], 2),
        # Ray's wall time that is not training steps, by phase (the median pair's)
        "ray_fixed_cost_s": middle["fixed_cost_s"],
        "per_pair": [{k: round(v, 4) for k, v in p.items() if isinstance(v, float)} for p in pairs],
        "ray_training_wall_s": training["wall_seconds"],
        "torchrun_setup_s": base["setup_s"],
        "torchrun_step_s": round(base["step_s"], 4),
        "packing_efficiency": data_stats["packing_efficiency"],
        "torchrun_packing_efficiency": base["packing_efficiency"],
        "train_rows": data_stats["train_rows"],
        "skipped_no_supervised_tokens": data_stats["skipped_no_supervised_tokens"],
        "ray_final_loss": training["final_metrics"].get("loss"),
        "torchrun_final_loss": base["history"][-1]["loss"],
        "ray_windows_tokens_per_s": [round(r["tokens_per_s"], 1) for r in ray_rows if "tokens_per_s" in r],
        "torchrun_windows_tokens_per_s": [round(r["tokens_per_s"], 1) for r in base["history"]],
        "memory_per_worker": memory,
        "config": {k: resolved(spec)[k] for k in ("model", "train", "deepspeed", "scaling")},
        "notes": [
            "same spec file, model builder, DeepSpeed config, LR schedule, model_inputs and micro-step loop in both",
            "both: DS_ACCELERATOR=cpu, gloo, fp32, torch AdamW, 1 torch thread per worker",
            "rows: Ray Data tokenizes and packs the whole train split once (map_batches) and gives each worker an "
            "equal shard (cut once in the driver before fit()); torchrun ranks tokenize and pack "
            "conversations[rank::world] in memory with the same TokenizeSamples/PackRows and pack batch size, so "
            "the rows differ but their packing efficiency should match (compare packing_efficiency with "
            "torchrun_packing_efficiency)",
            "ray windows include ray.train.report once per log_every steps; torchrun's only log",
            "ray_wall_s includes ray.init, tokenizer training, Ray Data, worker-group start, final eval, checkpoint "
            "and export; torchrun_wall_s includes process start, tokenization, DeepSpeed init, final eval, "
            "checkpoint and export, but not tokenizer training (it loads the tokenizer run (a) saved)",
            "memory: measured on each rank after one step (max over ranks); parameters are the rank's storage "
            "(ZeRO-3: its ds_tensor partitions plus the parameters below stage3_param_persistence_threshold, "
            "kept whole); gradients: .grad after backward (ZeRO-0) or the flat gradient partition (ZeRO-3); "
            "optimizer_state: AdamW exp_avg/exp_avg_sq; master_weights: fp32 copies held by the optimizer "
            "(none in fp32 runs); activations and communication buckets are not counted",
        ],
    }


if __name__ == "__main__":
    main()
