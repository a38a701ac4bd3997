"""Opens a report in real headless Chromium (Debian's ``chromium``, driven by Playwright).

Skipped where Chromium or Playwright is missing, except under CI (``CI=true``), which installs both.
"""

import os
import shutil

import pytest

from actclust import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser():
    if CHROMIUM is None:
        pytest.fail("CI must install chromium") if os.environ.get("CI") else pytest.skip("no chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("CI must install playwright") if os.environ.get("CI") else pytest.skip("no playwright")
    return sync_playwright


# every image of the report decodes in Chromium, the page raises no console error, it works offline
@pytest.mark.slow
def test_report_renders_in_chromium(fitted, data, tmp_path):
    sync_playwright = _browser()
    x, y = data
    path = report(fitted, x, y, train=x, out=tmp_path / "r.html", n_correct=3, n_wrong=3)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(path.as_uri(), wait_until="load")
            n_images = page.evaluate("document.images.length")
            broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
            cards = page.locator("article.card").count()
        finally:
            browser.close()
    assert n_images > 50 and broken == 0
    assert errors == [] and requests == []
    assert cards == 6
