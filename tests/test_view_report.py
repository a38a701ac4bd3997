"""The report reads well for text, tables and trust: words not one-token boxes, original units, red chips by threshold."""

import re

import numpy as np
import pytest
import torch

import actclust
from actclust import ActivationClustering, report

from conftest import chromium_playwright

TEXT = "a rather long review of a film that goes on for a while, with many words in it"


# a render that returns a string: the card shows the text as one readable block; thumbnails clamp it
def test_text_render(fitted, data, tmp_path):
    x, y = data
    html = report(fitted, x, y, train=x, render=lambda v: TEXT, out=tmp_path / "r.html", n_correct=1,
                  n_wrong=1).read_text()
    assert html.count(f'<div class="ph txt">{TEXT}</div>') == 2  # the two cards' inputs
    assert f'<div class="ph clamp" title="{TEXT}">' in html  # training samples, clamped with the whole text on hover


# token inputs: tokens from the tokenizer with the padding hidden, not ids and masks
def test_tokens_in_report(tmp_path):
    import zoo

    ids, mask, y = zoo.token_task(60, seq_len=20, min_len=13, seed=0)
    ac = ActivationClustering(zoo.tiny_bert(seed=0), ["bert.pooler", "classifier"], n_clusters=3, progress=False)
    ac.fit({"input_ids": ids, "attention_mask": mask}, y)
    vocab = ["[PAD]", "[CLS]", "cat", "dog", "eel"] + [f"w{i}" for i in range(5, 64)]
    data = {"input_ids": ids, "attention_mask": mask}
    html = report(ac, data, y, train=data, tokenizer=vocab, indices=[0], out=tmp_path / "r.html").read_text()
    strip = re.search(r'<div class="tok">(.*?)</div>', html, re.S).group(1)
    real = int(mask[0].sum())
    assert re.findall(r'<span class="t">([^<]*)</span>', strip) == [vocab[i] for i in ids[0, :real].tolist()]
    assert f"{20 - real} padding token" in strip and "attention_mask" not in html


# tables: mean/std give the data's own units; the feature that separates the clusters comes first
def test_tables_in_original_units_and_order(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.normal(50, 10, (300, 15)).astype(np.float32)
    raw[:, 3] += 40 * (rng.random(300) < 0.5)
    mean, std = raw.mean(0), raw.std(0)
    x = ((raw - mean) / std).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(15, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    with torch.no_grad():
        net[0].weight.mul_(0.1)
        net[0].weight[:, 3] = 3.0
    ac = ActivationClustering(net, ["1", "2"], n_clusters=4, progress=False).fit(x)
    names = [f"f{i}" for i in range(15)]
    plain = report(ac, x, train=x, feature_names=names, indices=[0], out=tmp_path / "a.html").read_text()
    units = report(ac, x, train=x, feature_names=names, indices=[0], mean=mean, std=std,
                   out=tmp_path / "b.html").read_text()
    card = re.search(r'<article class="card.*?</article>', units, re.S).group(0)
    first = re.search(r'<table class="feat">(.*?)</table>', card, re.S).group(1)
    rows = re.findall(r'title="([^"]+)">[^<]*</span></td><td class="v">([^<]+)</td>', first)
    assert rows[0][0] == "f3" and float(rows[0][1]) == pytest.approx(raw[0, 3], rel=1e-3)
    assert "features ordered by how far the input departs" in units
    assert plain != units and f"{x[0, 3]:.4g}" in plain


# trust chips are red exactly below the calibrated thresholds, which the page states
def test_report_trust_chips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 4)).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    y = np.where(rng.random(600) < 0.2, (pred + 1) % 3, pred)
    ac = ActivationClustering(net, ["0", "2"], n_clusters=3, progress=False).fit(x, y)
    html = report(ac, x[:40], y[:40], train=x, out=tmp_path / "r.html", n_correct=3, n_wrong=3).read_text()
    es = ac.explain(x[:40], y[:40])
    th = es[0].trust_thresholds["signals"]
    cards = re.findall(r'id="input-(\d+)".*?<div class="trust">Trust signals: (.*?)</div>', html, re.S)
    assert len(cards) == 6
    for row, chips in cards:
        trust = es[int(row)].trust
        for low, name in re.findall(r'<span class="chip( low)?" title="[^"]*">([a-z ]+) -?[0-9.]+</span>', chips):
            key = name.replace(" ", "_")
            assert (low == " low") == (key in th and trust[key] < th[key]), (row, key)
    assert "a red chip is below the threshold that 5% of held-out" in html


# in Chromium, a text input reads as a paragraph: wide, a few lines, not one word per line
@pytest.mark.slow
def test_text_layout_in_chromium(fitted, data, tmp_path):
    chromium, sync_playwright = chromium_playwright()
    x, y = data
    path = report(fitted, x, y, train=x, render=lambda v: TEXT, out=tmp_path / "r.html", n_correct=1, n_wrong=1)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(path.as_uri())
            box = page.evaluate("""() => { const e = document.querySelector('.card figure.big .ph');
                const r = e.getBoundingClientRect(); const lh = parseFloat(getComputedStyle(e).lineHeight);
                return {width: r.width, lines: Math.round((r.height - 8) / lh)}; }""")
            thumb = page.evaluate("() => document.querySelector('.sims figure.s.txt').getBoundingClientRect().width")
        finally:
            browser.close()
    assert box["width"] > 250 and box["lines"] <= 4, box
    assert thumb > 100


# mean/std that cannot fit the inputs (2 or 3 values for 1-channel images) are refused before any drawing, in the
# report, the notebook display, the explorer and a study (a report of placeholders and a warning per picture)
def test_mean_std_checked_up_front(fitted, data, tmp_path):
    from actclust.views.explorer import Explorer

    x, y = data
    match = r"mean has 2 values and std has 3 values, but the inputs, of shape \(1, 6, 6\) per sample, take one value"
    with pytest.raises(actclust.ParameterError, match=match):
        actclust.report(fitted, x[:10], y[:10], out=tmp_path / "r.html", mean=[0.1, 0.2], std=[1, 1, 1])
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(actclust.ParameterError, match=match):
        fitted.set_display(mean=[0.1, 0.2], std=[1, 1, 1])
    with pytest.raises(actclust.ParameterError, match=match):
        Explorer(fitted, x[:10], mean=[0.1, 0.2], std=[1, 1, 1], trust=False, progress=False)
    fitted.set_display(mean=0.5, std=[2.0])  # one value: every channel
    fitted.set_display(mean=torch.tensor([0.5]), std=torch.tensor(2.0))  # any framework's arrays
    with pytest.raises(actclust.ParameterError, match=r"mean has 6 values, but the inputs, of shape \(1, 6, 6\) per "
                                                      r"sample, take one value\."):
        fitted.set_display(mean=[0.5] * 6)  # one per column of a 1-channel image: no channel axis of 6
