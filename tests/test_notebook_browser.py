"""The notebook display in real headless Chromium: outputs placed in a notebook-like page, light and dark.

Skipped where Chromium or Playwright is missing, except under CI (``CI=true``), which installs both.
"""

import pytest

from conftest import XSS_CLASS, chromium_playwright

# A notebook page: its own styles (which ours must not change) and elements that share our class names
# outside the outputs, then one output cell per result.
_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>
body {{ background:{bg}; color:{fg}; font:14px sans-serif; margin:20px; }}
.cell {{ margin:14px 0; padding:8px; border-left:3px solid #888; }}
</style></head><body>
<div id="notebook-card" class="card">a notebook element named card</div>
<table id="notebook-table" class="grid"><tr><td>a notebook table</td></tr></table>
<span id="notebook-chip" class="chip low">a notebook chip</span>
{cells}
</body></html>"""

_CHECK_JS = """() => {
  const out = {};
  const imgs = Array.from(document.images);
  out.images = imgs.length;
  out.broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const card = getComputedStyle(document.getElementById("notebook-card"));
  const table = getComputedStyle(document.getElementById("notebook-table"));
  const chip = getComputedStyle(document.getElementById("notebook-chip"));
  out.leaks = [card.borderLeftWidth !== "0px", table.borderCollapse !== "separate",
               chip.borderTopWidth !== "0px", chip.color !== getComputedStyle(document.body).color];
  // every text of our outputs takes the page's colour, unless it is a red/green mark
  const body = getComputedStyle(document.body).color;
  const texts = Array.from(document.querySelectorAll(".acn h3, .acn td, .acn header b, .acn figcaption"));
  out.texts = texts.length;
  out.offColour = texts.filter(e => getComputedStyle(e).color !== body).map(e => e.textContent.slice(0, 30));
  out.wide = Array.from(document.querySelectorAll(".acn")).filter(e => e.scrollWidth > e.clientWidth + 2).length;
  // red and green marks (badges, low chips) at least 4.5:1 against what is behind them (WCAG AA)
  const rgb = c => c.match(/[\d.]+/g).map(Number);
  const lum = c => { const v = rgb(c).slice(0, 3).map(x => { x /= 255; return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; });
                     return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
  const behind = e => { for (; e; e = e.parentElement) { const b = getComputedStyle(e).backgroundColor;
                        const a = rgb(b); if (a.length === 3 || a[3] === 1) return b; } return "rgb(255, 255, 255)"; };
  const marks = Array.from(document.querySelectorAll(".acn .badge, .acn .chip.low"));
  out.marks = marks.length;
  out.lowContrast = marks.map(e => { const s = getComputedStyle(e), f = lum(s.color), b = lum(behind(e));
                                     return [e.textContent, (Math.max(f, b) + 0.05) / (Math.min(f, b) + 0.05)]; })
                         .filter(([, r]) => r < 4.5).map(([t, r]) => t + " " + r.toFixed(2));
  return out;
}"""


# each result drawn in a notebook-like page: images decode, no console error, no request; our styles do
# not leak onto the notebook's own elements; text follows the page's colour on a light and a dark theme
@pytest.mark.slow
@pytest.mark.parametrize("theme, bg, fg", [("light", "#ffffff", "rgb(31, 35, 40)"), ("dark", "#1e1e1e", "rgb(212, 212, 212)")])
def test_outputs_in_a_notebook_page(fitted, data, tmp_path, theme, bg, fg):
    chromium, sync_playwright = chromium_playwright()
    x, y = data
    fitted.set_display(train=x, class_names=[XSS_CLASS, "cat", "d" + "o" * 200 + "g"])  # a long name: no wider page
    outputs = [fitted._repr_html_(), fitted.score(x, y)._repr_html_(), fitted.explain(x[:3], y[:3])._repr_html_(),
               fitted.similar(x[:2], k=5)._repr_html_(), fitted.concepts("fc1", k=4)._repr_html_()]
    cells = "".join(f'<div class="cell">{html}</div>' for html in outputs)
    path = tmp_path / f"notebook-{theme}.html"
    path.write_text(_PAGE.format(bg=bg, fg=fg, cells=cells), encoding="utf-8")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(path.as_uri(), wait_until="load")
            found = page.evaluate(_CHECK_JS)
            page.screenshot(path=str(tmp_path / f"notebook-{theme}.png"), full_page=True)
            page.set_viewport_size({"width": 375, "height": 800})  # a phone, a narrow side panel
            narrow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
        finally:
            browser.close()
    assert errors == [] and requests == []
    assert found["images"] > 40 and found["broken"] == 0
    assert found["leaks"] == [False, False, False, False]
    assert found["texts"] > 30 and found["offColour"] == []
    assert found["wide"] == 0  # nothing wider than the output area at 1100 px
    assert narrow <= 2  # at 375 px the tables scroll in their own box (the summary and scores widened the page)
    assert found["marks"] >= 6 and found["lowContrast"] == []  # were 3.2-3.7:1 on white
