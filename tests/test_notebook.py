"""Notebook display: every result of a fitted explainer has a self-contained, scoped ``_repr_html_``."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from actclust import ActivationClustering, DataError, Explanation, ParameterError
from actclust.analysis import surrogate
from actclust.views.notebook import LIMITS, ConceptList, ExplanationList, Scores

from conftest import LAYERS, XSS_CLASS

NAMES = [XSS_CLASS, "cat", "dog"]


class Page(HTMLParser):
    """The parts of an HTML fragment the tests read: tags with attributes, text, style and script."""

    def __init__(self, html):
        super().__init__()
        self.tags, self.text, self.styles, self._in = [], [], [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        (self.styles if self._in == "style" else self.text).append(data)

    def count(self, tag, cls=None):
        return sum(t == tag and (cls is None or cls in a.get("class", "").split()) for t, a in self.tags)

    @property
    def words(self):
        return " ".join(" ".join(self.text).split())


def check_self_contained(html):
    """One root div.acn, no script, no external reference, every style rule under .acn; returns the parsed page."""
    page = Page(html)
    assert page.tags[0] == ("div", {"class": "acn"})
    assert page.count("script") == 0 and "<script" not in html.replace(XSS_CLASS.replace("<", "&lt;"), "")
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert "http:" not in html and "https:" not in html
    css = re.sub(r"/\*.*?\*/", "", "".join(page.styles), flags=re.S)
    selectors = [sel.strip() for block in re.findall(r"([^{}]+)\{[^{}]*\}", css) for sel in block.split(",")]
    assert selectors and all(sel.startswith(".acn") for sel in selectors), [s for s in selectors if not s.startswith(".acn")]
    for _, attrs in page.tags:
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/png;base64,")
    return page


# explain returns a list that still is one, and draws as cards: pictures of the inputs, samples by index
def test_explanations_are_a_list_and_draw_cards(fitted, data):
    x, y = data
    es = fitted.explain(x[:3], y[:3], class_names=NAMES, trust=False)
    assert isinstance(es, list) and isinstance(es, ExplanationList) and len(es) == 3
    assert isinstance(es[:2], ExplanationList) and len(es[:2]) == 2 and isinstance(es[0], Explanation)
    assert json.loads(json.dumps([e.to_dict() for e in es]))[0]["index"] == 0
    assert es == list(es) and Explanation.from_json(es[1].to_json()) == es[1]
    html = es._repr_html_()
    page = check_self_contained(html)
    assert page.count("article", "card") == 3 and page.count("img") == 3  # the inputs; training samples by index
    assert "3 explanations" in page.words and "DNN right on" in page.words
    assert "ac.set_display(train=x_train)" in page.words
    # a class name with HTML in it is escaped: text to the browser, never markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and any(XSS_CLASS in v for _, a in page.tags for v in a.values())
    one = check_self_contained(es[1]._repr_html_())
    assert one.count("article", "card") == 1 and "Input #1" in one.words


# with training inputs attached, exemplars and similar samples are pictures; more than the limit are counted
def test_explanations_with_training_inputs_and_truncation(fitted, data):
    x, y = data
    fitted.set_display(train=x, class_names=NAMES)
    es = fitted.explain(x[:12], y[:12], k=3, trust=False)
    page = check_self_contained(es._repr_html_())
    n = LIMITS["explanations"]
    assert page.count("article", "card") == n
    per_card = 1 + len(LAYERS) * min(3, LIMITS["exemplars"]) + 2 * 3  # input, exemplars, low and high
    assert page.count("img") == n * per_card
    assert f"… {12 - n} more explanations not shown" in page.words


# trust chips: red exactly where a signal is below its stated threshold, and the rule is said
def test_trust_chips_follow_thresholds():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 4)).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    y = np.where(rng.random(600) < 0.2, (pred + 1) % 3, pred)  # about 20% DNN errors
    ac = ActivationClustering(net, ["0", "2"], n_clusters=3, progress=False).fit(x, y)
    es = ac.explain(x[:10], trust=True)
    th = es[0].trust_thresholds
    assert th["false_alarm_rate"] == 0.05 and th["calibration"] == "a held-out split of the training data"
    assert "stacked_trust" in th["signals"] and "ood_typicality" in th["signals"]
    html = es._repr_html_()
    chips = re.findall(r'<span class="chip( low)?" title="([^"]*)">([A-Za-z -]+) -?[0-9.]+'
                       r'(<span class="vh"> \(below its threshold\)</span>)?</span>', html)
    expected = [(i, k) for i in range(10) for k in es[i].trust]
    titles = {"dnn_confidence": "DNN confidence", "surrogate_dnn_agreement": "surrogate-DNN agreement",
              "knn_typicality": "kNN typicality", "ood_typicality": "OOD typicality", "stacked_trust": "stacked trust",
              "surrogate_confidence": "surrogate confidence", "layer_agreement": "layer agreement",
              "credibility": "credibility", "cluster_typicality": "cluster typicality"}  # as a reader writes them
    assert [name for _, _, name, _ in chips] == [titles[k] for _, k in expected]
    flags = [low == " low" for low, _, _, _ in chips]
    assert flags == [k in th["signals"] and es[i].trust[k] < th["signals"][k] for i, k in expected]
    # a flagged chip says so in words too (not by its colour alone), and each says what its signal means
    assert [bool(said) for _, _, _, said in chips] == flags
    from actclust.analysis.trust import MEANINGS

    assert all(title.startswith(MEANINGS[k].replace("'", "&#39;")) for (_, title, _, _), (_, k) in zip(chips, expected))
    assert "What the trust signals mean" in html
    assert any(flags) and not all(flags)
    assert "below the threshold that 5% of held-out inputs the DNN got right fall under" in Page(html).words


# neighbours: a table of indices, distances, classes and layer shares; pictures with nb.show(train=...)
def test_neighbours_table_and_pictures(fitted, data):
    x, y = data
    nb = fitted.similar(x[:12], k=12)
    page = check_self_contained(nb._repr_html_())
    q, k = LIMITS["queries"], LIMITS["neighbours"]
    assert page.count("tr") == 1 + q * k and page.count("img") == 0
    assert f"#{nb.indices[0, 0]}" in page.words and f"{nb.distances[0, 0]:.3f}" in page.words
    assert "2 more inputs" in page.words and "2 more neighbours per input" in page.words
    shown = check_self_contained(nb.show(train=x)._repr_html_())
    assert shown.count("img") == q * (1 + k)  # each input and its neighbours
    with pytest.raises(DataError, match="train has 5 samples but the explainer was fitted on 120"):
        nb.show(train=x[:5])


# concepts: one card per cluster, size and purity, exemplar pictures once training inputs are attached
def test_concepts_cards(fitted, data):
    cs = fitted.concepts("fc1", k=3, n_edge=1)
    assert isinstance(cs, ConceptList) and len(cs) == 4 and isinstance(cs[:2], ConceptList)
    page = check_self_contained(cs._repr_html_())
    assert page.count("section", "concept") == 4 and page.count("img") == 0
    for c in cs:
        assert f"{c.size} samples" in page.words or f"{c.size} sample " in page.words
    pictures = check_self_contained(cs.show(train=data[0])._repr_html_())
    assert pictures.count("img") == sum(len(c.exemplars) + len(c.edge) for c in cs)
    assert check_self_contained(cs[0]._repr_html_()).count("section", "concept") == 1


# scores: still the dict score() returned, drawn as a table of the same numbers
def test_scores_dict_and_table(fitted, data):
    x, y = data
    s = fitted.score(x, y)
    q = fitted.query(x, y)
    plain = surrogate.scores(q.dnn_pred, fitted.state_.layer_probas(q.distances), q.labels, fitted.weights_, LAYERS)
    assert isinstance(s, Scores) and isinstance(s, dict) and s == plain and json.loads(json.dumps(s)) == plain
    page = check_self_contained(s._repr_html_())
    assert f"{s['fidelity']:.4f}" in page.words and f"{s['dnn_accuracy']:.4f}" in page.words
    assert all(f"{v['fidelity']:.4f}" in page.words for v in s["per_layer"].values())


# the estimator: its parameters before fit; layers, weights and in-sample fidelity after
def test_estimator_summary(model, fitted):
    page = check_self_contained(ActivationClustering(model, LAYERS, n_clusters=4)._repr_html_())
    assert "(not fitted)" in page.words and "n_clusters 4" in page.words
    page = check_self_contained(fitted._repr_html_())
    assert "120 training samples" in page.words
    for l, w in zip(LAYERS, fitted.weights_):
        assert l in page.words
    assert f"{fitted.train_score_['fidelity']:.4f}" in page.words


# attaching display options is checked against the fit
def test_set_display_errors(fitted, data):
    with pytest.raises(DataError, match="train has 7 samples but the explainer was fitted on 120"):
        fitted.set_display(train=data[0][:7])
    with pytest.raises(ParameterError, match="class_names must name the 3 classes; got 2 names"):
        fitted.set_display(class_names=["a", "b"])


def _tabular(n=300, f=15, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.normal(50, 10, (n, f)).astype(np.float32)
    raw[:, 3] += 40 * (rng.random(n) < 0.5)  # feature 3 splits the data in two
    mean, std = raw.mean(0), raw.std(0)
    x = ((raw - mean) / std).astype(np.float32)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(f, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    with torch.no_grad():
        net[0].weight.mul_(0.1)
        net[0].weight[:, 3] = 3.0
    ac = ActivationClustering(net, ["1", "2"], n_clusters=4, progress=False).fit(x)
    return ac, raw, x, mean, std


# a tabular input: values in the data's own units (mean/std), the features that matter first
def test_tabular_card_units_and_order():
    ac, raw, x, mean, std = _tabular()
    names = [f"f{i}" for i in range(15)]
    ac.set_display(train=x, mean=mean, std=std, feature_names=names)
    es = ac.explain(x[:2], trust=False)
    page = check_self_contained(es._repr_html_())
    table = re.search(r'<table class="feat">(.*?)</table>', es._repr_html_(), re.S).group(1)
    rows = re.findall(r'title="([^"]+)">[^<]*</td><td class="v">([^<]+)</td>', table)
    assert len(rows) == 12 and rows[0][0] == "f3"  # the feature that separates the clusters first
    j = names.index(rows[0][0])
    assert float(rows[0][1]) == pytest.approx(raw[0, j], rel=1e-3)  # its value in the data's own units
    assert "+3 more features" in page.words and "departs from the training mean" in page.words


# text inputs: tokens from the tokenizer, padding hidden, special tokens marked; ids without a tokenizer
def test_token_inputs_as_tokens(data):
    import zoo

    ids, mask, y = zoo.token_task(60, seq_len=20, min_len=13, seed=0)
    bert = zoo.tiny_bert(seed=0)
    ac = ActivationClustering(bert, ["bert.pooler", "classifier"], n_clusters=3, progress=False)
    ac.fit({"input_ids": ids, "attention_mask": mask}, y)
    vocab = ["[PAD]", "[CLS]", "cat", "dog", "eel"] + [f"w{i}" for i in range(5, 64)]
    inputs = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    ac.set_display(train={"input_ids": ids, "attention_mask": mask}, tokenizer=vocab)
    html = ac.explain(inputs, trust=False)._repr_html_()
    strips = re.findall(r'<div class="tok">(.*?)</div>', html, re.S)
    assert len(strips) == 2
    tokens = re.findall(r'<span class="t( sp)?">([^<]*)</span>', strips[0])
    real = int(mask[0].sum())
    assert [t for _, t in tokens] == [vocab[i] for i in ids[0, :real].tolist()]
    assert f"{20 - real} padding tokens hidden" in strips[0] or real == 19
    ac.set_display()
    plain = ac.explain(inputs, trust=False)._repr_html_()
    assert "pass tokenizer= to show words" in plain and f'<span class="t">{int(ids[0, 1])}</span>' in plain


# every long wait shows progress: the first explain's trust calibration, the first concepts' assignment pass,
# the explorer's start; and a run's TrustWarning is said once, however often trust is calibrated again
def test_progress_and_one_warning(capsys, monkeypatch):
    import warnings

    from actclust import TrustWarning
    from actclust.views.explorer import Explorer

    monkeypatch.setattr("actclust.store.vectors.CHUNK", 4)  # so that 600 samples are a "large" set
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 4)).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    ac = ActivationClustering(net, ["0", "2"], n_clusters=3, progress=True).fit(x)  # no labels: a TrustWarning
    capsys.readouterr()
    ac.concepts("2")
    assert "assigning the training vectors of 2" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ac.explain(x[:3])
        err = capsys.readouterr().err
        ac.explain(x[:3], search="exact")  # another calibration
        ac.trust(x[:3], n_neighbors=20)  # and another
    assert "calibrating trust" in err and "assigning the training vectors of 0" in err
    assert sum(issubclass(w.category, TrustWarning) for w in caught) == 1
    Explorer(ac, x[:20], progress=True)
    assert "preparing the explorer" in capsys.readouterr().err


# drawing problems are placeholders with a warning that says what to change
def test_render_errors_are_clear():
    from actclust import RenderWarning
    from actclust.views.render import Renderer

    with pytest.warns(RenderWarning, match="mean/std give 3/1 values for a row of 4 features; give one value, or one per"):
        assert Renderer(mean=[0, 0, 0])(np.zeros(4, np.float32), "x")["kind"] == "error"
    with pytest.warns(RenderWarning, match="tokenizer is a float; give a Hugging Face tokenizer, a function"):
        Renderer(tokenizer=1.5)(np.arange(3), "x")
    with pytest.warns(RenderWarning, match="the tokenizer gave 1 tokens for 3 ids"):
        Renderer(tokenizer=lambda ids: ["one"])(np.arange(1, 4), "x")
    tokens = Renderer(tokenizer={1: "a", 2: "b"})(np.array([1, 2, 7, 0, 0]), "x")
    assert [t for t, _ in tokens["tokens"]] == ["a", "b", "[7]"] and tokens["hidden"] == 2  # trailing pad ids


# neighbours made outside the explainer cannot be drawn with training inputs, and say so
def test_show_needs_the_explainer(fitted, data):
    from actclust.analysis import retrieval

    nb = fitted.similar(data[0][:2], k=3)
    bare = retrieval.Neighbours(nb.indices, nb.distances, nb.layer_shares, nb.weights)
    assert "#" in bare._repr_html_()  # still a table, by index
    with pytest.raises(ParameterError, match="These neighbours do not know their explainer; draw the results of"):
        bare.show(train=data[0])


# a class-mix bar's tooltip lists the largest shares first (in class order, with 100 classes the big ones were hard
# to find: an outside check), in the notebook and in the report
def test_mix_tooltips_list_the_largest_first(mixed_fitted, data, tmp_path):
    x, y = data
    from actclust import report

    pages = [mixed_fitted.explain(x[:8], trust=False)._repr_html_(),
             report(mixed_fitted, x[:40], y[:40], out=tmp_path / "r.html", trust=False).read_text()]
    for page in pages:
        tips = [t for t in re.findall(r'class="mix" title="([^"]*)"', page) if t.count("%") > 1]
        assert tips  # mixes of several classes
        for tip in tips:
            shares = [float(v) for v in re.findall(r"(\d+(?:\.\d+)?)%", tip)]
            assert shares == sorted(shares, reverse=True), tip
