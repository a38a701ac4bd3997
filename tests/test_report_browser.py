"""Opens a report in real headless Chromium (Debian's ``chromium``, driven by Playwright).

Skipped where Chromium or Playwright is missing, except under CI (``CI=true``), which installs both.
"""

import numpy as np
import pytest

from actclust import report

from conftest import chromium_playwright


# every image of the report decodes in Chromium, the page raises no console error, it works offline
@pytest.mark.slow
def test_report_renders_in_chromium(fitted, data, tmp_path):
    chromium, sync_playwright = chromium_playwright()
    x, y = data
    path = report(fitted, x, y, train=x, out=tmp_path / "r.html", n_correct=3, n_wrong=3)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
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


def _tabular_report(tmp_path):
    """A report on 15 features (more than a table shows), a few with long names, from a small MLP."""
    import torch
    from torch import nn

    from actclust import ActivationClustering

    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 15)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(15, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    ac = ActivationClustering(mlp, ["0", "2", "4"], n_clusters=3, progress=False).fit(x, y)
    names = [f"feature_{i}" if i % 3 else f"a_rather_long_feature_name_number_{i}_in_millimetres" for i in range(15)]
    return report(ac, x, y, train=x, feature_names=names, class_names=["low", "middle", "high"],
                  out=tmp_path / "tab.html", n_correct=2, n_wrong=1, k=4, n_exemplars=3, n_edge=1)


# Boxes that overlap on the page, as readable strings; empty when the layout is clean. Tables of
# samples must not intersect one another, every cell stays inside its table and every table inside
# the box that holds it, and no text (table cells, class-mix numbers) sits on a class-mix bar.
_OVERLAPS_JS = """() => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });  // measure every concept
  const boxes = new Map(), box = e => boxes.get(e) || boxes.set(e, e.getBoundingClientRect()).get(e);
  const seen = e => e.checkVisibility() && box(e).width > 0;
  const cut = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) > 0.5
                     && Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 0.5;
  const inside = (a, b) => a.left >= b.left - 0.5 && a.right <= b.right + 0.5
                        && a.top >= b.top - 0.5 && a.bottom <= b.bottom + 0.5;
  const name = e => `${e.tagName.toLowerCase()}${e.className ? "." + e.className.replace(/ /g, ".") : ""}`
                    + ` "${e.textContent.trim().slice(0, 20)}" in #${e.closest("[id]").id}`;
  const tables = [...document.querySelectorAll("table.feat")].filter(seen);
  const bars = [...document.querySelectorAll(".mix")].filter(seen);
  const out = [];
  tables.forEach((t, i) => tables.slice(i + 1).forEach(u => {
    // a table folded into another's last row (an input's features past the first rows) lies inside it
    if (!t.contains(u) && !u.contains(t) && cut(box(t), box(u))) out.push(`tables overlap: ${name(t)} / ${name(u)}`);
  }));
  for (const t of tables) {
    const holder = t.closest("td, .concept, .card-body > div, .sims > div");
    if (!inside(box(t), box(holder))) out.push(`table outside its ${name(holder)}: ${name(t)}`);
    for (const c of t.querySelectorAll("td")) {
      if (!inside(box(c), box(t))) out.push(`cell outside its table: ${name(c)}`);
      if (c.scrollWidth > c.clientWidth + 1) out.push(`text overflows its cell: ${name(c)}`);
      for (const b of bars) if (cut(box(c), box(b))) out.push(`cell on a class-mix bar: ${name(c)}`);
    }
  }
  const labels = [...document.querySelectorAll(".mixnum")].filter(seen);
  for (const l of labels) {
    const bar = l.parentElement.querySelector(".mix");
    if (!bar || cut(box(l), box(bar))) out.push(`class-mix number on its bar: ${name(l)}`);
  }
  return {problems: out, tables: tables.length, bars: bars.length, labels: labels.length};
}"""


# a tabular report reads cleanly at a wide, a middle and a phone width: sample tables never overlap
# each other or a class-mix bar, cells stay in their tables, class-mix numbers sit beside their bars
def test_tabular_report_layout_in_chromium(tmp_path):
    chromium, sync_playwright = chromium_playwright()
    path = _tabular_report(tmp_path)
    found = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(path.as_uri(), wait_until="load")
            for width in (1280, 800, 560):
                page.set_viewport_size({"width": width, "height": 900})
                found[width] = page.evaluate(_OVERLAPS_JS)
        finally:
            browser.close()
    assert requests == []
    for width, f in found.items():
        assert f["tables"] > 20 and f["bars"] > 20, f"only {f['tables']} tables, {f['bars']} bars at {width} px"
        assert f["problems"] == [], f"at {width} px: " + "; ".join(f["problems"][:40])
        assert f["labels"] > 0, f"no class-mix numbers beside the layer rows' bars at {width} px"


# a page never scrolls sideways, on a phone (375 px) or a desktop, even with long, unbroken class names: wide
# tables scroll inside their own box (a report's summary table made the page 559 px wide at 375 px, a
# 120-character class name ran under the vote bar), the explorer's pages too (its layer page's legend was one
# line 34,667 px wide) (found by an outside browser check)
@pytest.mark.slow
def test_pages_fit_narrow_and_wide_windows(fitted, data, tmp_path):
    from actclust.views.explorer import Explorer, make_app
    from conftest import LiveServer

    chromium, sync_playwright = chromium_playwright()
    x, y = data
    names = ["n" * 120, "a very long class name that goes on " * 4, "<b>x</b>"]
    path = report(fitted, x, y, train=x, out=tmp_path / "r.html", n_correct=2, n_wrong=2, class_names=names)
    # the model predicts class 1: an unbroken name of 66 letters in every sample's caption made the page 627 px wide
    unbroken = [names[0], "class_1_with_an_extraordinarily_long_descriptive_name_that_goes_on", names[2]]
    path2 = report(fitted, x, y, train=x, out=tmp_path / "r2.html", n_correct=2, n_wrong=2, class_names=unbroken)
    explorer = Explorer(fitted, x[:60], y[:60], train=x, class_names=names, progress=False)
    widths = {}
    with LiveServer(make_app(explorer, "t"), "the explorer") as app, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for width in (375, 1280):
                page = browser.new_page(viewport={"width": width, "height": 900})
                for url in [path.as_uri(), path2.as_uri()] + [f"{app.url}{route}?token=t" for route in
                                              ("/", "/inputs", "/layer/conv", "/input/0", "/cluster/fc1/0")]:
                    page.goto(url, wait_until="load")
                    widths[width, url.split("?")[0]] = page.evaluate("document.documentElement.scrollWidth")
                page.close()
        finally:
            browser.close()
    wide = {k: v for k, v in widths.items() if v > k[0]}
    assert len(widths) == 14 and wide == {}, wide


_BIDI_JS = """() => {
  const out = {numbers: [], headers: [], captions: []};
  const oneLine = e => {  // its text's line boxes all at one height (a flex item's own box stretches to its row's)
    const r = document.createRange();
    r.selectNodeContents(e);
    return new Set(Array.from(r.getClientRects()).map(x => Math.round(x.top))).size <= 1;
  };
  for (const span of document.querySelectorAll("article.card > header > span")) {
    const b = span.querySelector("b"), after = b && b.nextSibling;
    if (!after || after.nodeType !== 3 || !after.data.includes("(")) continue;
    const r = document.createRange(), at = after.data.indexOf("(");
    r.setStart(after, at); r.setEnd(after, at + 1);
    out.numbers.push([span.textContent.trim(), r.getBoundingClientRect().left - b.getBoundingClientRect().right]);
  }
  for (const h of document.querySelectorAll(".concept header")) {
    if (h.getBoundingClientRect().height === 0) continue;  // a closed layer
    out.headers.push([h.textContent.trim(), oneLine(h.children[0]), oneLine(h.children[1])]);
  }
  for (const f of document.querySelectorAll("figure.s figcaption")) {
    if (f.getBoundingClientRect().height > 0) out.captions.push([f.textContent.trim(), oneLine(f)]);
  }
  return out;
}"""


# right-to-left class names keep the numbers beside them in place ("DNN: <name> (0.98)"; the bidirectional algorithm
# drew "DNN: (0.98) <name>"), and a long class name leaves a concept's number and size on one line each and its
# samples' captions on one line (they broke a letter a line, and overprinted each other) (an outside browser check)
@pytest.mark.slow
def test_right_to_left_and_long_class_names_in_chromium(mixed_fitted, data, tmp_path):
    chromium, sync_playwright = chromium_playwright()
    x, y = data
    names = ["שתיים", "واحد 1", "Pneumonoultramicroscopicsilicovolcanoconiosis and a long class name with spaces"]
    path = report(mixed_fitted, x, y, train=x, class_names=names, out=tmp_path / "r.html", n_correct=3, n_wrong=3)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(path.as_uri(), wait_until="load")
            found = page.evaluate(_BIDI_JS)
        finally:
            browser.close()
    rtl = [(text, gap) for text, gap in found["numbers"] if names[0] in text or names[1] in text]
    assert len(rtl) >= 4, found["numbers"]
    assert all(gap >= 0 for _, gap in rtl), f"numbers left of their names: {rtl}"
    assert any(names[2] in text for text, _, _ in found["headers"]), found["headers"]
    assert all(a and b for _, a, b in found["headers"]), [h for h in found["headers"] if not (h[1] and h[2])]
    assert len(found["captions"]) > 10 and all(ok for _, ok in found["captions"]), \
        [c for c in found["captions"] if not c[1]][:5]


_CARDS_JS = """() => Array.from(document.querySelectorAll('.concept')).map(c => {
  const tops = boxes => new Set(Array.from(boxes).map(b => Math.round(b.top))).size;
  const head = c.querySelector('header'), figures = Array.from(c.querySelectorAll('.thumbs:not(.edge) > figure'));
  const lines = e => { const r = document.createRange(); r.selectNodeContents(e); return tops(r.getClientRects()); };
  return {exemplars: figures.length, rows: tops(figures.map(f => f.getBoundingClientRect())),
          head: [lines(head.children[0]), lines(head.children[1])]};
})"""


# the explorer's concept cards at desktop and phone widths: a card's six exemplars in one row (the sixth wrapped alone
# onto a second row from 1,280 to 1,440 px), its number and size on one line each beside a long class name (they broke
# a letter a line); the list of test inputs shows its trust column beside long names (it was cut) (an outside browser check)
def _small_run(n: int, n_clusters: int):
    """``(explainer, x, y)``: the mixed TinyCNN fitted on ``n`` random images with labels."""
    from actclust import ActivationClustering
    from conftest import LAYERS, TinyCNN

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, n)
    return ActivationClustering(TinyCNN(seed=3, bias=False).eval(), LAYERS, n_clusters=n_clusters,
                                progress=False).fit(x, y), x, y


@pytest.mark.slow
def test_explorer_concept_cards_in_chromium():
    from actclust.views.explorer import Explorer, make_app
    from conftest import LAYERS, LiveServer

    chromium, sync_playwright = chromium_playwright()
    ac, x, y = _small_run(400, 6)
    long = "Pneumonoultramicroscopicsilicovolcanoconiosis and a long class name with spaces"
    names = [f"{n} {long}" for n in ("שתיים", "واحد 1", "three")]  # every card's header holds a long name
    explorer = Explorer(ac, x[:60], y[:60], train=x, class_names=names, progress=False)
    found, hidden = {}, {}
    with LiveServer(make_app(explorer, "t"), "the explorer") as app, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            for width in (1440, 1280, 1100, 1024, 600, 390):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(f"{app.url}/layer/{LAYERS[0]}?token=t", wait_until="load")
                found[width] = page.evaluate(_CARDS_JS)
                if width >= 1024:  # the list of test inputs keeps its trust column in view beside long names
                    page.goto(f"{app.url}/inputs?token=t", wait_until="load")
                    hidden[width] = page.evaluate("(t => t.scrollWidth - t.clientWidth)(document.getElementById('inputs'))")
                page.close()
        finally:
            browser.close()
    for width, cards in found.items():
        assert len(cards) == 6 and all(c["exemplars"] == 6 for c in cards), (width, cards)
        assert all(c["rows"] == 1 and c["head"] == [1, 1] for c in cards), (width, cards)
    assert hidden == {1440: 0, 1280: 0, 1100: 0, 1024: 0}, hidden


_MAP_LABELS_JS = """() => {
  const t = Array.from(document.querySelectorAll('svg.map text')).map(e => e.getBBox());
  const c = Array.from(document.querySelectorAll('svg.map circle')).map(e => e.getBBox());
  const hit = (a, b) => Math.min(a.x + a.width, b.x + b.width) - Math.max(a.x, b.x) > 0.5 &&
                        Math.min(a.y + a.height, b.y + b.height) - Math.max(a.y, b.y) > 0.5;
  const out = {labels: t.length, on_labels: 0, on_circles: 0};
  for (let i = 0; i < t.length; i++) {
    for (let j = i + 1; j < t.length; j++) if (hit(t[i], t[j])) out.on_labels++;
    for (let j = 0; j < c.length; j++) if (j !== i && hit(t[i], c[j])) out.on_circles++;
  }
  return out;
}"""


# the layer map's labels ("c9") cover neither each other nor another cluster's centre, as drawn by Chromium (its text
# boxes): before, this run's three maps had labels over other centres, 4 in all (an outside check saw c9 over c13)
@pytest.mark.slow
def test_explorer_map_labels_apart_in_chromium():
    from actclust.views.explorer import Explorer, make_app
    from conftest import LAYERS, LiveServer

    chromium, sync_playwright = chromium_playwright()
    ac, x, y = _small_run(600, 15)
    found = {}
    with LiveServer(make_app(Explorer(ac, x[:60], y[:60], train=x, progress=False), "t"), "the explorer") as app, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            for layer in LAYERS:
                page.goto(f"{app.url}/layer/{layer}?token=t", wait_until="load")
                found[layer] = page.evaluate(_MAP_LABELS_JS)
        finally:
            browser.close()
    assert found == {l: {"labels": 15, "on_labels": 0, "on_circles": 0} for l in LAYERS}, found
