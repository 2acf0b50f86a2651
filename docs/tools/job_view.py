"""The picture of a chatforge job's page on the Ray dashboard in docs/operations.md.

    .venv/bin/python docs/tools/job_view.py                 # writes docs/img/job-dashboard.png
    .venv/bin/python docs/tools/job_view.py --out DIR

Starts a Ray head on 127.0.0.1 (`ray start --head`, 2 CPUs, its own temp dir and free ports) with token
authentication on: a generated token in a file of that temp dir (``RAY_AUTH_TOKEN_PATH``). Submits a curation of 200
generated ShareGPT conversations (some with PII, some near-copies) with ``chatforge submit curate
pipelines/curate.yaml ... --wait``, signs headless Chromium (Playwright) in to the dashboard the way its token dialog
does (``POST /api/authenticate`` with the token as a bearer header, answered with an HttpOnly cookie, so the token is
never on the page), and screenshots the job's page into ``OUT/job-dashboard.png``. The head is stopped by its
processes' PIDs at the end, whatever happened; the machine's other Rays are left alone.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from helpers.corpus import write_sharegpt_jsonl  # noqa: E402
from helpers.network import free_port  # noqa: E402
from helpers.ray_head import stop_head  # noqa: E402

BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"[job-view] {message}", file=sys.stderr, flush=True)


def start_head(temp_dir: Path, env: dict[str, str], token: str) -> str:
    """`ray start --head` on 127.0.0.1 with every port a free one; returns the dashboard's URL once it answers."""
    dashboard, workers = free_port(), free_port()
    ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")  # fmt: skip
    argv = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        *(f"--{name}={free_port()}" for name in ports), f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 200}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    started = subprocess.run(argv, env=env, timeout=180, capture_output=True, text=True)
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{started.stderr[-3000:]}")
    url = f"http://127.0.0.1:{dashboard}"
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    for _ in range(90):
        with suppress(OSError):
            if urllib.request.urlopen(request, timeout=5).status == 200:
                return url
        time.sleep(1.0)
    raise TimeoutError(f"the dashboard at {url} did not answer")


def submit(dashboard: str, temp_dir: Path, env: dict[str, str]) -> str:
    """`chatforge submit curate ... --wait` of a small generated corpus; returns the job's id."""
    corpus = temp_dir / "corpus.jsonl"
    write_sharegpt_jsonl(corpus, 200, seed=7, pii_every=9, near_every=11)
    argv = [
        str(BIN / "chatforge"), "submit", "curate", "pipelines/curate.yaml",
        "--input", str(corpus), "--format", "sharegpt", "--output", str(temp_dir / "curated"),
        "--address", dashboard, "--wait",
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"chatforge submit failed:\n{result.stderr[-3000:]}")
    return result.stdout.splitlines()[0]


# scrolls the dashboard's log view (it renders only the lines in sight) to chatforge's summary table
SHOW_SUMMARY = r"""async (box) => {
  for (let top = box.scrollHeight; top >= 0; top -= box.clientHeight / 2) {
    box.scrollTop = top;
    await new Promise((resolve) => setTimeout(resolve, 100));
    const line = [...box.querySelectorAll("div[style*='top']")].find((e) => /curated \d+ records/.test(e.textContent));
    if (line) { box.scrollTop = parseFloat(line.style.top); return true; }
  }
  return false;
}"""


def screenshot(dashboard: str, token: str, job_id: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1110})
            # what the dashboard's token dialog does: the answer sets the session's HttpOnly cookie in this context
            signed_in = context.request.post(
                f"{dashboard}/api/authenticate", headers={"Authorization": f"Bearer {token}"}
            )
            if not signed_in.ok:
                raise RuntimeError(f"the dashboard refused the token: HTTP {signed_in.status}")
            page = context.new_page()
            page.goto(f"{dashboard}/#/jobs/{job_id}")
            page.get_by_text("SUCCEEDED").first.wait_for(timeout=60_000)
            page.get_by_text("Ray Core Overview").click()  # folds the task progress away, so the log fits below
            log = page.locator(".hljs-light")  # the driver's log
            log.get_by_text("Running entrypoint").wait_for(timeout=60_000)
            if not log.evaluate(SHOW_SUMMARY):
                raise RuntimeError("the job's log has no curation summary")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(path))
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs/img"))
    args = parser.parse_args()
    path = Path(args.out) / "job-dashboard.png"
    path.parent.mkdir(parents=True, exist_ok=True)

    temp_dir = Path(tempfile.mkdtemp(prefix="cfjob-", dir="/tmp"))  # short: Ray's unix sockets live under it
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # a job's `python` is this venv's, with chatforge
    try:
        dashboard = start_head(temp_dir, env, token)
        say(f"head up, dashboard {dashboard}")
        job_id = submit(dashboard, temp_dir, env)
        say(f"{job_id} succeeded")
        screenshot(dashboard, token, job_id, path)
        print(path)
    finally:
        stop_head(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
