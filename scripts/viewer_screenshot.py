"""The README's viewer screenshot: a scan scored by a model-store model, as a user sees it in the viewer page.

    .venv/bin/python scripts/viewer_screenshot.py --model_name kermany-oct --image samples/kermany/CNV/CNV-103044-1.jpeg

Starts `python -m service` on a free loopback port with the given model, opens the page in Debian's chromium through
Playwright (no browser download), uploads the image, waits for the score and the heatmap, and saves a screenshot
(default docs/img/viewer.png).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.launch import ServiceProcess, StartFailed  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_store", default=str(ROOT / "model_store"))
    p.add_argument("--model_name", default="kermany-oct")
    p.add_argument("--image", required=True, help="a JPEG or PNG B-scan")
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "viewer.png"))
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    if not Path(args.chromium).exists():
        print(f"error: no chromium at {args.chromium} (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    svc = ServiceProcess({"OCT_MODEL_STORE": args.model_store, "OCT_MODEL_NAME": args.model_name, "OCT_DEVICE": "cpu"})
    url = svc.url
    try:
        try:
            svc.start(timeout=120)
        except StartFailed as e:
            print(f"error: the service {e}", file=sys.stderr)
            return 1
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/")
            page.set_input_files("#file", args.image)
            page.wait_for_selector("body[data-state=done]")
            page.wait_for_selector("#overlay:not([data-busy])", state="attached")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            print(f"{args.out}: {page.inner_text('#score')}")
            browser.close()
    finally:
        svc.stop(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
