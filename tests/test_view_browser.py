"""The explorer in real headless Chromium (Playwright): click through every page type and check what shows.

Skipped where Chromium or Playwright is missing, except under CI (``CI=true``), which installs both.
"""

import re

import numpy as np
import pytest

from actclust import ActivationClustering
from actclust.views.explorer import Explorer, make_app

from conftest import LAYERS, XSS_CLASS, LiveServer, TinyCNN, chromium_playwright

TOKEN = "browser-token"

# Every image on the page decoded, and none broken.
_IMAGES_JS = "() => [document.images.length, Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length]"


# run -> layer (sorted) -> cluster -> test input -> cluster on its path -> input list (filtered, paged) -> 404 and back
@pytest.mark.slow
def test_click_through_every_page(tmp_path):
    chromium, sync_playwright = chromium_playwright()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((260, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 260)
    ac = ActivationClustering(TinyCNN(seed=3, bias=False).eval(), LAYERS, n_clusters=4, progress=False).fit(x[:200], y[:200])
    ex = Explorer(ac, x[200:], y[200:], train=x[:200], class_names=[XSS_CLASS, "cat", "dog"], progress=False)
    wrong = int((ac.query(x[200:]).dnn_pred != y[200:]).sum())
    visited, errors, outside = [], [], []
    with LiveServer(make_app(ex, TOKEN), "the explorer") as live, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((live.url, "data:")) else None)

            def seen(kind):
                n, broken = page.evaluate(_IMAGES_JS)
                visited.append((kind, page.url, n, broken))
                page.screenshot(path=str(tmp_path / f"{kind}.png"), full_page=True)

            page.goto(f"{live.url}/?token={TOKEN}")
            assert page.locator("h1").inner_text() == "actclust run"
            assert page.locator("#layers tr").count() == 1 + len(LAYERS) + 2  # header, layers, combined, DNN
            assert XSS_CLASS in page.locator(".legend").inner_text()  # shown as text, not run
            seen("run")

            page.click("nav.top >> text=fc1")
            assert page.url.endswith("/layer/fc1") and page.locator("section.concept").count() == 4
            assert page.locator("svg.map circle").count() == 4 and page.locator("svg.map path.dots").count() > 1
            page.click("#sorts >> text=purity")
            assert page.url.endswith("sort=purity")
            seen("layer")

            page.click("section.concept header a >> nth=0")
            assert re.search(r"/cluster/fc1/\d+$", page.url) and "cluster c" in page.locator("h1").inner_text()
            assert page.locator("#members figure").count() > 0
            seen("cluster")

            page.click("#tests a >> nth=0")
            assert re.search(r"/input/\d+$", page.url) and page.locator("h1").inner_text().startswith("Test input #")
            assert page.locator("#path tr").count() == 1 + len(LAYERS)
            assert page.locator("#similar figure").count() == 2 * 6
            seen("input")

            page.click("#path a.chip >> nth=0")  # the first layer's cluster on this input's path
            assert re.search(r"/cluster/conv/\d+$", page.url)
            page.click("nav.top >> text=Test inputs")
            assert page.locator("#inputs tr").count() == 1 + 50
            page.click("#filters >> text=wrong")
            assert page.locator("#inputs tr").count() == 1 + min(wrong, 50)
            assert f"Test inputs: {wrong} the DNN got wrong" in page.locator("h1").inner_text()
            seen("inputs")

            clean = list(errors)  # the 404 page below is meant to be one, and Chromium logs it
            page.goto(f"{live.url}/input/999")
            assert "There is no test input '999'" in page.locator("#message").inner_text()
            page.click("#back")
            assert page.url.endswith("/inputs")
        finally:
            browser.close()
    assert clean == [] and outside == []
    assert all("404" in e for e in errors[len(clean):])
    assert {v[0] for v in visited} == {"run", "layer", "cluster", "input", "inputs"}
    for kind, url, n, broken in visited:
        assert broken == 0, (kind, url)
        assert n > 0 or kind == "run", (kind, url)
