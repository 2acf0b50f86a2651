"""Held-out perplexity of the base model and of the fine-tuned one on the same curated test split.

    .venv/bin/python benchmarks/quickstart_quality.py --json          # after `make demo` (or the quickstart by hand)

Prints JSON: for each model its token-weighted perplexity over the assistant tokens of the test split (the masks
training uses, see chatforge.eval.perplexity), tokens and conversations scored, and seconds taken; `ratio` is
fine-tuned / base perplexity (below 1: fine-tuning helped on held-out data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    from chatforge.config import DEFAULT_MODEL
    from chatforge.eval.perplexity import model_perplexity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "runs/quickstart/curated/data"))
    parser.add_argument("--model", default=os.path.join(ROOT, "runs/quickstart/train/model"), help="fine-tuned dir")
    parser.add_argument("--base", default=DEFAULT_MODEL, help="the model it was fine-tuned from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row (the quickstart's)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N conversations")
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args()

    report = {"data": args.data, "split": args.split, "max_length": args.max_length}
    for name, ref in (("base", args.base), ("fine_tuned", args.model)):
        started = time.perf_counter()
        result = model_perplexity(ref, args.data, args.split, args.max_length, args.limit)
        report[name] = {"model": ref, **result.as_dict(), "seconds": round(time.perf_counter() - started, 1)}
        if not args.json:
            print(f"{name}: perplexity {result.perplexity:.2f} on {result.tokens:,} tokens", file=sys.stderr)
    report["ratio"] = round(report["fine_tuned"]["perplexity"] / report["base"]["perplexity"], 4)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
