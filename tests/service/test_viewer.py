"""The viewer page (`GET /`) in a real browser: Debian's chromium driven by Playwright, against the real service.

Screenshots land in test-artifacts/viewer/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import KERMANY, ROOT, encode
from test_heatmap_box import with_white_margins

sys.path.insert(0, str(ROOT / "tests" / "pacs"))
from oct_dicom import PHI, oct_dataset, phantom_frames, to_bytes

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (dev extra) is missing")
expect, sync_playwright = sync_api.expect, sync_api.sync_playwright
ARTIFACTS = ROOT / "test-artifacts" / "viewer"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# Alpha of the overlay canvas, counted inside and outside the heatmap box, and summed.
OVERLAY_STATS = """box => {
  const c = document.getElementById('overlay');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let inside = 0, outside = 0, sum = 0;
  for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
    const a = d[(y * c.width + x) * 4 + 3];
    if (!a) continue;
    sum += a;
    if (x >= box.x0 && x < box.x1 && y >= box.y0 && y < box.y1) inside++; else outside++;
  }
  return {inside, outside, sum, width: c.width, height: c.height};
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it with apt-get)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url: str, **context):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, **context)
    page = ctx.new_page()
    page.crashes = []  # uncaught script errors: a page that throws fails its test
    page.on("pageerror", lambda e: page.crashes.append(str(e)))
    page.goto(url + "/")
    return page


@pytest.fixture
def page(browser, service) -> Iterator:
    page = open_page(browser, service.url)
    wait_model(page)
    yield page
    page.context.close()
    assert page.crashes == []


def upload(page, name: str, data: bytes, mime: str) -> None:
    page.set_input_files("#file", {"name": name, "mimeType": mime, "buffer": data})
    page.wait_for_selector("body[data-state=done], body[data-state=error]")
    wait_drawn(page)


# Waits go through selectors and locators: the page's Content-Security-Policy forbids the eval that
# wait_for_function polls with (and a test under the real policy is the point).
def drop(page, name: str, data: bytes, mime: str) -> None:
    """Drag and drop a file onto the drop zone, as a user dragging it from their desktop."""
    transfer = page.evaluate_handle(
        "([name, bytes, mime]) => { const t = new DataTransfer(); "
        "t.items.add(new File([new Uint8Array(bytes)], name, {type: mime})); return t; }", [name, list(data), mime])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("body[data-state=done], body[data-state=error]")


def wait_drawn(page) -> None:
    page.wait_for_selector("#overlay:not([data-busy])", state="attached")


def wait_model(page) -> None:
    expect(page.locator("#model")).to_have_text(re.compile(r"^Model \S+ version"))


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_page_loads_only_from_the_service(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for asset, kind in (("/static/viewer.js", "javascript"), ("/static/viewer.css", "css")):
        assert asset in r.text
        assert kind in client.get(asset).headers["content-type"]
    missing = client.get("/static/..%2Fmain.py")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


def test_a_scan_shows_the_api_score_in_words(page, client: httpx.Client, scan_bytes: bytes) -> None:
    page.keyboard.press("Tab")  # keyboard first: the first stop is the file picker
    assert page.evaluate("document.activeElement.id") == "file"
    upload(page, "scan.jpeg", scan_bytes, "image/jpeg")
    unlabelled = page.evaluate("[...document.querySelectorAll('input')].filter(i => !i.labels.length).map(i => i.id)")
    assert unlabelled == []
    api = client.post("/score", files={"file": ("scan.jpeg", scan_bytes, "image/jpeg")}).json()
    model = client.get("/models").json()
    assert float(page.get_attribute("#score", "data-value")) == api["score"]
    assert float(page.text_content("#score")) == pytest.approx(api["score"], rel=1e-3)
    assert float(page.text_content("#threshold").split()[0]) == pytest.approx(api["threshold"], rel=1e-3)
    assert page.text_content("#model") == f"Model {model['name']} version {model['version']} on {model['device']}"
    verdict = page.text_content("#verdict")
    assert verdict == ("Outside the normal range" if api["is_anomalous"] else "Within the normal range")
    p = round(model["scores"][model["primary_score"]]["threshold_percentile"])
    assert f"{'above' if api['score'] > api['threshold'] else 'below'} the threshold" in page.text_content("#explain")
    assert f"the {p}th percentile of normal scans" in page.text_content("#explain")
    assert "normal scan" in page.text_content("#percentile")
    assert page.is_hidden("#volume") and page.is_hidden("#key-panel")
    shot(page, "scan.png")


def test_overlay_covers_the_scan_not_its_margins(page, client: httpx.Client) -> None:
    data = encode(with_white_margins(KERMANY / "DME-1102486-1.jpeg"))
    upload(page, "margins.png", data, "image/png")
    api = client.post("/score", files={"file": ("margins.png", data, "image/png")}).json()
    box = api["heatmap_box"]
    stats = page.evaluate(OVERLAY_STATS, box)
    assert (stats["width"], stats["height"]) == (box["x1"] + 60, box["y1"])  # the canvas is the upload's size
    assert stats["inside"] > 0 and stats["outside"] == 0
    shot(page, "kermany-margins.png")

    toggles = page.locator("#map-toggles input[type=checkbox]")
    assert sorted(toggles.evaluate_all("els => els.map(e => e.dataset.map)")) == sorted(api["heatmaps"])
    before = stats["sum"]
    for i in range(toggles.count()):  # keyboard: focus each toggle, Space switches it
        toggles.nth(i).focus()
        page.keyboard.press("Space")
        wait_drawn(page)
    flipped = page.evaluate(OVERLAY_STATS, box)
    assert flipped["sum"] != before and flipped["outside"] == 0
    for i in range(toggles.count()):
        toggles.nth(i).uncheck()
    wait_drawn(page)
    assert page.evaluate(OVERLAY_STATS, box)["sum"] == 0
    toggles.nth(0).check()
    wait_drawn(page)
    one = page.evaluate(OVERLAY_STATS, box)["sum"]

    page.focus("#opacity")
    page.keyboard.press("End")  # 100 %
    wait_drawn(page)
    full = page.evaluate(OVERLAY_STATS, box)["sum"]
    page.keyboard.press("Home")  # 0 %
    wait_drawn(page)
    assert full > one > 0 and page.evaluate(OVERLAY_STATS, box)["sum"] == 0
    assert page.text_content("#opacity-value") == "0%"


def test_usable_on_a_tablet(browser, service, scan_bytes: bytes) -> None:
    page = open_page(browser, service.url, is_mobile=True, has_touch=True)
    page.set_viewport_size({"width": 768, "height": 1024})
    wait_model(page)
    upload(page, "scan.jpeg", scan_bytes, "image/jpeg")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 768  # no sideways scrolling
    shot(page, "tablet.png")
    page.context.close()
    assert page.crashes == []


def test_corrupt_file_shows_the_problem(page, client: httpx.Client) -> None:
    junk = b"\x89PNG\r\n\x1a\n" + b"not really a PNG" * 8
    drop(page, "broken.png", junk, "image/png")
    problem = client.post("/score", files={"file": ("broken.png", junk, "image/png")}).json()
    text = page.text_content("#error")
    assert page.is_visible("#error")
    assert problem["title"] in text and problem["detail"] in text
    shot(page, "error.png")


def test_three_frame_dicom_gives_three_frame_scores(page, client: httpx.Client) -> None:
    data = to_bytes(oct_dataset(phantom_frames(3, rows=96, cols=128)))
    upload(page, "volume.dcm", data, "application/dicom")
    api = client.post("/score", files={"file": ("volume.dcm", data, "application/dicom")}).json()
    bars = page.locator("#strip .bar")
    assert bars.count() == 3
    assert [float(s) for s in bars.evaluate_all("els => els.map(e => e.dataset.score)")] == \
        [f["score"] for f in api["frames"]]
    assert page.get_attribute("#frame", "max") == "2"
    top = api["max_frame"]
    assert page.input_value("#frame") == str(top)  # a volume opens on its most anomalous frame
    page.focus("#frame")
    page.keyboard.press("Home")
    wait_drawn(page)
    assert page.text_content("#frame-label") == "1 of 3"
    assert float(page.get_attribute("#score", "data-value")) == api["frames"][0]["score"]
    page.click("#jump")
    wait_drawn(page)
    assert page.input_value("#frame") == str(top)
    assert f"most anomalous is frame {top + 1}" in page.text_content("#volume-summary")
    html = page.content()
    assert not any(v in html for v in PHI.values())  # the page shows nothing from the DICOM header
    shot(page, "volume.png")


def test_api_key_is_asked_for_and_kept_in_the_tab(browser, start_service) -> None:
    svc = start_service(OCT_API_KEYS="viewer-key", OCT_WARMUP="false")
    page = open_page(browser, svc.url)
    page.wait_for_selector("#key-panel", state="visible")
    page.fill("#api-key", "viewer-key")
    page.keyboard.press("Enter")
    wait_model(page)
    assert page.is_hidden("#key-panel")
    assert page.evaluate("sessionStorage.getItem('oct-api-key')") == "viewer-key"
    assert page.evaluate("localStorage.length") == 0
    page.context.close()
    assert page.crashes == []


def test_a_volume_with_a_frame_without_a_retina(browser, start_service, retina_model) -> None:
    """A model of the retina band: the refused frame shows its reason, the strip marks it, the volume's summary
    says it was left out, and the scored frames draw their band heatmaps over their boxes."""
    svc = start_service(model=retina_model, OCT_WARMUP="false")
    frames = np.stack([np.asarray(Image.open(KERMANY / f).convert("L"))
                       for f in ("NORMAL-1017237-1.jpeg", "CNV-103044-2.jpeg")])
    noise = np.random.default_rng(3).integers(0, 256, frames.shape[1:], dtype=np.uint8)
    data = to_bytes(oct_dataset(np.stack([frames[0], noise, frames[1]])))
    page = open_page(browser, svc.url)
    wait_model(page)
    upload(page, "volume.dcm", data, "application/dicom")
    api = httpx.post(f"{svc.url}/score", files={"file": ("volume.dcm", data, "application/dicom")},
                     timeout=60).json()
    assert "refused" in api["frames"][1] and api["max_frame"] != 1
    assert page.locator("#strip .bar.refused").count() == 1
    assert "1 not scored (no retina found) and left out" in page.text_content("#volume-summary")
    box = api["frames"][api["max_frame"]]["heatmap_box"]
    stats = page.evaluate(OVERLAY_STATS, box)
    assert stats["inside"] > 0 and stats["outside"] == 0  # the band's heatmap, stretched over the box
    page.focus("#frame")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")  # frame 2, the noise
    wait_drawn(page)
    assert page.text_content("#frame-label") == "2 of 3" and page.text_content("#verdict") == "Not scored"
    assert "no retina" in page.text_content("#explain") and page.get_attribute("#score", "data-value") == ""
    assert page.evaluate(OVERLAY_STATS, box)["sum"] == 0  # no heatmap for a frame that was not scored
    shot(page, "volume-refused-frame.png")
    page.context.close()
    assert page.crashes == []
