"""The streaming JSON-array reader on one long string: time and peak memory for 1, 4 and 16 MiB strings.

    .venv/bin/python benchmarks/json_reader.py                             # chatforge's reader, and ijson's
    .venv/bin/python benchmarks/json_reader.py --module /tmp/old/sources.py --sizes 1 4   # another sources.py

Each file is a ShareGPT array of three records, the middle one holding a string of the given size (prose with a
``\\n`` escape every ~80 characters). Readers:
- ``chatforge``: `sources.iter_json_elements` with the default ``read.max_record_bytes`` (16 MiB: the 16 MiB string
  is reported as too large, after being scanned), and ``chatforge_64k`` with a 64 KiB limit (the long record is
  reported and never buffered);
- ``ijson``: ``ijson.items(f, "item")`` on its C backend (yajl2_c), each element serialized back to text (what the
  next stage takes), when ijson is installed. It has no size limit: an element is built whole.
Each measurement runs in a fresh process: ``seconds`` is the read, ``peak_mib`` the process's peak resident memory
above what it held before the read. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def write_file(path: str, string_mib: float) -> None:
    line = "the quick brown fox jumps over the lazy dog while the garden grows green by the"[:78] + "\n"
    text = line * (int(string_mib * MIB) // len(line) + 1)
    text = text[: int(string_mib * MIB)]
    small = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    big = {"id": "b", "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump([small, big, {**small, "id": "c"}], f)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _load_sources(module: str | None):
    if module is None:
        from chatforge.data import sources

        return sources
    spec = importlib.util.spec_from_file_location("sources_under_test", module)
    sources = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sources  # dataclasses look their module up
    spec.loader.exec_module(sources)
    return sources


def child(reader: str, path: str, module: str | None) -> dict:
    """One measurement, in this (fresh) process."""
    from chatforge.config import ReadSpec

    if reader == "ijson":
        import ijson

        def elements():
            with open(path, "rb") as f:
                for number, item in enumerate(ijson.items(f, "item", use_float=True), 1):
                    yield number, json.dumps(item, ensure_ascii=False), None
    else:
        sources = _load_sources(module)
        read = ReadSpec(max_record_bytes=64 << 10) if reader == "chatforge_64k" else ReadSpec()

        def elements():
            return sources.iter_json_elements(path, read)

    before = _rss_bytes()
    started = time.perf_counter()
    results = [(number, len(text), error) for number, text, error in elements()]
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "seconds": round(seconds, 3),
        "peak_mib": round(max(peak, 0) / MIB, 1),
        "elements": [{"chars": n, "error": e} for _, n, e in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16], help="string sizes in MiB")
    parser.add_argument("--module", help="a sources.py to measure instead of chatforge's (e.g. before a change)")
    parser.add_argument("--readers", nargs="+", default=["chatforge", "chatforge_64k", "ijson"])
    parser.add_argument("--json", action="store_true", help="accepted for the other benchmarks' sake: always JSON")
    parser.add_argument("--child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.module)))
        return

    try:
        import ijson
    except ImportError:
        ijson = None
    readers = [r for r in args.readers if r != "ijson" or ijson is not None]
    out: dict = {
        "module": args.module or "chatforge.data.sources",
        "ijson_backend": ijson.backend if ijson else None,
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = os.path.join(tmp, f"{size}.json")
            write_file(path, size)
            row = {"file_mib": round(os.path.getsize(path) / MIB, 2)}
            for reader in readers:
                command = [sys.executable, __file__, "--child", reader, path]
                command += ["--module", args.module] if args.module else []
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                row[reader] = json.loads(done.stdout.strip().splitlines()[-1])
            out["results"][f"{size:g}MiB"] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
