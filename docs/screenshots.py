"""Make the screenshots in docs/img/ (notebook display and explorer), in headless Chromium.

    python docs/screenshots.py            # about a minute on 2 cores; needs Fashion-MNIST and chromium

A small CNN is trained on 12,000 Fashion-MNIST images (2 epochs, seeded) and explained over its
four layers; a tiny BERT (tests/zoo.py) on the synthetic token task shows text; scikit-learn's
breast-cancer table shows tabular inputs. Each notebook result is placed in a notebook-like page
(light, and one dark) and its output cell photographed; the explorer is served on loopback and
each page type photographed.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
IMG = ROOT / "img"
sys.path.insert(0, str(ROOT.parent / "tests"))

PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>
body {{ background:{bg}; color:{fg}; font:14px sans-serif; margin:16px; }}
.cell {{ padding:10px 12px; border-left:3px solid #999; margin:0 0 16px; width:max-content; max-width:1100px; }}
.prompt {{ font:12px monospace; opacity:.6; margin-bottom:6px; }}
</style></head><body>{cells}</body></html>"""


def fashion():
    from actclust import ActivationClustering
    from actclust.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
    from actclust.models import fashion_cnn, train_classifier

    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(x_tr), 12_000, replace=False))
    x_tr, y_tr = x_tr[pick], y_tr[pick]
    torch.manual_seed(0)
    model = train_classifier(fashion_cnn(), x_tr, y_tr, epochs=2, batch_size=128, progress=False).eval()
    ac = ActivationClustering(model, ["conv1", "conv2", "fc1", "fc2"], n_clusters=12, progress=False).fit(x_tr, y_tr)
    return ac, x_tr, y_tr, x_te[:2000], y_te[:2000], list(FASHION_MNIST_CLASSES)


def notebook_shots(browser, ac, x_tr, x_te, y_te, names):
    ac.set_display(train=x_tr, class_names=names)
    es = ac.explain(x_te[:12], y_te[:12], k=6)
    wrong = [i for i, e in enumerate(es) if e.label != e.dnn["prediction"]][:1]
    shots = {
        "notebook-explain": ("es = ac.explain(x_test[:12], y_test[:12]); es", es[:2]._repr_html_()),
        "notebook-similar": ("ac.similar(x_test[:3], k=8, weights='high')", ac.similar(x_te[:3], k=8, weights="high")._repr_html_()),
        "notebook-similar-table": ("ac.similar(x_test[:2], k=5)   # no training inputs attached",
                                   _without_train(ac, x_te)),
        "notebook-concepts": ('ac.concepts("fc1", k=5)[:6]', ac.concepts("fc1", k=5)[:6]._repr_html_()),
        "notebook-summary": ("ac; ac.score(x_test, y_test)", ac._repr_html_() + ac.score(x_te, y_te)._repr_html_()),
    }
    for name, (prompt, html) in shots.items():
        _cell(browser, name, prompt, html)
    if wrong:
        _cell(browser, "notebook-explain-dark", f"es[{wrong[0]}]   # a dark theme", es[wrong[0]]._repr_html_(), dark=True)


def _without_train(ac, x_te):
    from actclust.views.notebook import neighbours_html

    nb = ac.similar(x_te[:2], k=5)
    return neighbours_html(nb, nb._context.with_display(train=None))


def _cell(browser, name, prompt, html, dark=False):
    page = browser.new_page(viewport={"width": 1180, "height": 800}, device_scale_factor=1)
    bg, fg = ("#1e1e1e", "#d4d4d4") if dark else ("#ffffff", "#1f2328")
    cell = f'<div class="cell"><div class="prompt">In [1]: {prompt}</div>{html}</div>'
    path = IMG / f".{name}.html"
    path.write_text(PAGE.format(bg=bg, fg=fg, cells=cell), encoding="utf-8")
    page.goto(path.as_uri(), wait_until="load")
    page.locator(".cell").screenshot(path=str(IMG / f"{name}.png"))
    page.close()
    path.unlink()


def text_and_table_shots(browser):
    import zoo
    from sklearn.datasets import load_breast_cancer

    from actclust import ActivationClustering

    ids, mask, y = zoo.token_task(400, seq_len=24, min_len=13, seed=0)
    bert = zoo.train_token_model(zoo.tiny_bert(seed=0), ids, mask, y, epochs=4, seed=0)
    words = ("the film plot was actors story music scene ending long short slow fast funny dark bright camera light "
             "sound script cast role voice score pace tone mood world time people place night day city road house "
             "water fire sky sea tree stone glass paper wood iron gold silver red blue green old new first last big "
             "small loud quiet warm cold soft hard true false odd").split()
    vocab = ["[PAD]", "[CLS]", "good", "bad", "meh"] + words[:59]
    assert len(vocab) == 64
    ac = ActivationClustering(bert, ["bert.encoder.layer.1", "bert.pooler", "classifier"],
                              reducer={"bert.encoder.layer.1": "token_mean", "bert.pooler": "mean", "classifier": "mean"},
                              n_clusters=6, progress=False)
    ac.fit({"input_ids": ids[:300], "attention_mask": mask[:300]}, y[:300])
    ac.set_display(train={"input_ids": ids[:300], "attention_mask": mask[:300]}, tokenizer=vocab,
                   class_names=["good", "bad", "meh"])
    es = ac.explain({"input_ids": ids[300:301], "attention_mask": mask[300:301]}, y[300:301], k=3, trust=False)
    _cell(browser, "notebook-text", "ac.set_display(train=..., tokenizer=vocab); ac.explain(batch)", es._repr_html_())

    data = load_breast_cancer()
    raw = data.data.astype(np.float32)
    mean, std = raw.mean(0), raw.std(0)
    x = (raw - mean) / std
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(30, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 2))
    zoo_train(mlp, x, data.target)
    ac = ActivationClustering(mlp, ["1", "3", "4"], n_clusters=6, progress=False).fit(x[:450], data.target[:450])
    ac.set_display(train=x[:450], mean=mean, std=std, feature_names=list(data.feature_names),
                   class_names=list(data.target_names))
    es = ac.explain(x[450:451], data.target[450:451], k=3, trust=False)
    _cell(browser, "notebook-table", "ac.set_display(train=x_train, mean=mean, std=std, feature_names=...); "
                                     "ac.explain(x_test[:1], y_test[:1])", es._repr_html_())


def zoo_train(model, x, y, epochs=80):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[:450]), yt[:450]).backward()
        opt.step()
    model.eval()


def explorer_shots(browser, ac, x_tr, x_te, y_te, names):
    import uvicorn

    from actclust.views.explorer import Explorer, make_app

    ac.set_display()
    ex = Explorer(ac, x_te, y_te, train=x_tr, class_names=names, title="actclust view: fashion-mnist CNN",
                  progress=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(make_app(ex, "docs"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/?token=docs")
        wrong = int(np.flatnonzero(ex.q.dnn_pred != y_te)[0])
        big = max(range(12), key=lambda c: len(ex.layers["fc1"].members(c)))
        for name, path in (("explorer-run", "/"), ("explorer-layer", "/layer/fc1"),
                           ("explorer-cluster", f"/cluster/fc1/{big}"), ("explorer-input", f"/input/{wrong}"),
                           ("explorer-inputs", "/inputs?show=flagged&sort=trust")):
            page.goto(url + path)
            page.screenshot(path=str(IMG / f"{name}.png"))
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def main():
    from playwright.sync_api import sync_playwright

    IMG.mkdir(parents=True, exist_ok=True)
    ac, x_tr, y_tr, x_te, y_te, names = fashion()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        try:
            notebook_shots(browser, ac, x_tr, x_te, y_te, names)
            text_and_table_shots(browser)
            explorer_shots(browser, ac, x_tr, x_te, y_te, names)
        finally:
            browser.close()
    for f in sorted(IMG.glob("*.png")):
        print(f"{f.relative_to(ROOT.parent)}: {f.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
