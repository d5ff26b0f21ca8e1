"""The README's viewer screenshots: scans scored by a model-store model, as a user sees them in the viewer page.

    .venv/bin/python scripts/viewer_screenshot.py --image samples/kermany/CNV/CNV-1188386-2.jpeg
    .venv/bin/python scripts/viewer_screenshot.py --image <CNV scan> --image <DME scan> --image <DRUSEN scan> \
        --out docs/img/real-lesions.png

Starts `python -m service` on a free loopback port with the given model (default: the newest kermany-oct), opens the
page in Debian's chromium through Playwright (no browser download), uploads each image, waits for the score and the
heatmap, and saves a screenshot of the page (one image; default docs/img/viewer.png) or, for several images, the
viewer's scan with its heatmap for each, side by side, each titled with its file name and the page's verdict.
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
    p.add_argument("--image", required=True, action="append", help="a JPEG or PNG B-scan (repeat: side by side)")
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
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            panels = []
            for image in args.image:
                page.set_input_files("#file", image)
                page.wait_for_selector("body[data-state=done]")
                page.wait_for_selector("#overlay:not([data-busy])", state="attached")
                print(f"{image}: {page.inner_text('#verdict')}, score {page.inner_text('#score')}")
                if len(args.image) == 1:
                    page.screenshot(path=args.out, full_page=True)
                else:
                    panels.append((Path(image).name, page.inner_text("#verdict"),
                                   page.locator("#scan").screenshot()))
            browser.close()
        if panels:
            side_by_side(panels, args.out)
        print(f"wrote {args.out}")
    finally:
        svc.stop(30)
    return 0


def side_by_side(panels: list[tuple[str, str, bytes]], out: str, height: int = 320) -> None:
    """Each panel (file name, verdict, PNG of the viewer's scan with its heatmap) at one height, titled, in a row."""
    import io

    from PIL import Image, ImageChops, ImageDraw

    images = []
    for name, verdict, png in panels:
        im = Image.open(io.BytesIO(png)).convert("RGB")
        # The canvas letterboxes the scan in the page's background colour: keep the scan.
        background = Image.new("RGB", im.size, im.getpixel((0, im.height // 2)))
        im = im.crop(ImageChops.difference(im, background).getbbox() or (0, 0, im.width, im.height))
        im = im.resize((round(im.width * height / im.height), height))
        titled = Image.new("RGB", (im.width, height + 28), "white")
        titled.paste(im, (0, 28))
        ImageDraw.Draw(titled).text((6, 8), f"{name}: {verdict}", fill="black")
        images.append(titled)
    gap = 12
    sheet = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), height + 28), "white")
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width + gap
    sheet.save(out)


if __name__ == "__main__":
    sys.exit(main())
