"""The picture of the human evaluation page in docs/serving.md.

    .venv/bin/python docs/tools/human_eval_view.py                   # the demo's model and its loop candidate
    .venv/bin/python docs/tools/human_eval_view.py --model A --candidate B --out docs/img

Starts a local Ray (2 CPUs) and chatforge's Serve app on 127.0.0.1 with two variants (``--model`` as
``chatforge-quickstart``, ``--candidate`` as ``candidate-0001``) and API keys, signs in on /ui/compare in headless
Chromium (Playwright), casts a few votes, and screenshots the compare page and the results page into
``OUT/human-eval-compare.png`` and ``OUT/human-eval-results.png``; prints the paths as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/quickstart/train/model")
    parser.add_argument("--candidate", default="runs/quickstart/loop/cycle-0001/train/model")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--votes", type=int, default=6)
    args = parser.parse_args()

    import ray
    from playwright.sync_api import sync_playwright
    from ray import serve

    from chatforge.lifecycle import free_port
    from chatforge.serve.app import build_app

    key = secrets.token_urlsafe(24)
    os.environ["CHATFORGE_DOCS_KEYS"] = key
    port = free_port()
    store = Path(tempfile.mkdtemp()) / "feedback.db"
    engine = {"default_max_tokens": 48, "max_tokens_limit": 128}
    variants = [
        {"name": "chatforge-quickstart", "model": args.model, "engine": engine, "num_cpus": 0.5},
        {"name": "candidate-0001", "model": args.candidate, "engine": engine, "num_cpus": 0.5, "weight": 0},
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = {
            "variants": variants,
            "auth": {"api_keys_env": "CHATFORGE_DOCS_KEYS"},
            "feedback": {"url": f"sqlite:///{store}", "url_env": None},
            "ingress_num_cpus": 0.25,
        }
        serve.run(build_app(app_args), name="chatforge", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        compare_png, results_png = out / "human-eval-compare.png", out / "human-eval-results.png"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(f"{url}/ui/compare")
            page.get_by_label("API key").fill(key)
            page.keyboard.press("Enter")
            for vote in range(args.votes):
                page.get_by_role("heading", name="Which answer is better?").wait_for(timeout=300_000)
                choice = ("A is better", "B is better", "Tie")[vote % 3]
                page.get_by_role("button", name=choice).click()
            page.get_by_role("status").wait_for(timeout=300_000)
            page.screenshot(path=str(compare_png), full_page=True)
            page.get_by_role("link", name="Results").click()
            page.get_by_role("table").wait_for()
            page.screenshot(path=str(results_png), full_page=True)
            browser.close()
        print(json.dumps({"compare": str(compare_png), "results": str(results_png)}))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
