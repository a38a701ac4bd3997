import os
import re

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from actclust import DataError, RunExistsError, report


def _imgs(html: str) -> int:
    return len(re.findall(r'<img class="px" src="data:image/png;base64,', html))


# the report is one file with the summary, explanation cards and every concept
def test_report_contents(fitted, data, tmp_path):
    x, y = data
    path = report(fitted, x, y, train=x, out=tmp_path / "sub" / "r.html", n_correct=2, n_wrong=2, k=3,
                  class_names=["cat", "dog", "eel"])
    html = path.read_text()
    assert path.parent.name == "sub" and "http" not in html.replace("http-equiv", "")
    s = fitted.score(x, y)
    assert f"{s['fidelity']:.4f}" in html and f"{s['dnn_accuracy']:.4f}" in html
    assert html.count('<article class="card') == 4 and html.count('class="concept"') == 12
    assert _imgs(html) > 12 * 4 and "eel" in html
    assert "DNN wrong" in html and "DNN right" in html


# without labels, cards are picked by surrogate agreement; without train, samples show indices
def test_report_without_labels_or_train(fitted, data, tmp_path):
    html = report(fitted, data[0], out=tmp_path / "r.html", n_correct=1, n_wrong=1).read_text()
    assert "no labels given" in html and "Training inputs were not given" in html
    assert _imgs(html) == html.count('<article class="card')  # only the explained inputs are images


# a Dataset of (input, label) items, chosen indices
def test_report_dataset_and_indices(fitted, data, tmp_path):
    ds = TensorDataset(torch.as_tensor(data[0]), torch.as_tensor(data[1]))
    html = report(fitted, ds, train=ds, indices=[5, 9], out=tmp_path / "r.html").read_text()
    assert 'id="input-5"' in html and 'id="input-9"' in html and "chosen by the caller" in html


# a DataLoader works as the inputs and as the training data
def test_report_dataloader(fitted, data, tmp_path):
    from torch.utils.data import DataLoader

    loader = DataLoader(TensorDataset(torch.as_tensor(data[0]), torch.as_tensor(data[1])), batch_size=32)
    html = report(fitted, loader, train=loader, n_correct=1, n_wrong=1, out=tmp_path / "r.html").read_text()
    assert html.count('<article class="card') == 2 and "Training inputs were not given" not in html


# a render that raises: a warning, a visible placeholder naming the input, the report completes
def test_report_render_failure(fitted, data, tmp_path):
    def render(x):
        if float(np.asarray(x).sum()) > 0:
            raise ValueError("cannot draw this one")
        return "ok"

    with pytest.warns(UserWarning, match="cannot draw this one"):
        html = report(fitted, data[0], data[1], train=data[0], render=render, out=tmp_path / "r.html").read_text()
    assert "could not render" in html and "sample(s) could not be rendered" in html


# tabular inputs are shown as feature tables
def test_report_tabular(tmp_path):
    from actclust import ActivationClustering

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = np.random.default_rng(0).standard_normal((80, 4)).astype(np.float32)
    ac = ActivationClustering(net, ["0", "2"], n_clusters=3, progress=False).fit(x)
    html = report(ac, x, train=x, feature_names=["age", "bmi", "bp", "s1"], out=tmp_path / "r.html").read_text()
    assert 'title="bmi">bmi<' in html and _imgs(html) == 0



# an input of more features than a table shows: its card's table folds the others (an outside check could not open
# them: "+N more features" was text), first those along which it departs like its cluster (FeatureOrder)
def test_report_tabular_folds_the_rest(tmp_path):
    import re

    from actclust import ActivationClustering
    from actclust.views.features import FeatureOrder

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = np.random.default_rng(0).standard_normal((80, 30)).astype(np.float32)
    ac = ActivationClustering(net, ["0", "2"], n_clusters=3, progress=False).fit(x)
    names = [f"feat{i:02d}" for i in range(30)]
    html = report(ac, x, train=x, feature_names=names, indices=[0], out=tmp_path / "r.html").read_text()
    card = html[html.index('<article class="card'):]
    table = card[:card.index("</figure>")]
    folded = table[table.index("<details>"):table.index("</details>")]
    shown = re.findall(r'title="(feat\d\d)"', table[:table.index("<details>")])
    assert len(shown) == 12 and "+18 more features</summary>" in folded
    assert len(re.findall(r'title="(feat\d\d)"', folded)) == 18
    cluster = ac.explain(x[:1])[0].layers[-1]["cluster"]
    expected = FeatureOrder.from_train(ac.state_, x).of_input(x[0], cluster)
    assert shown == [names[j] for j in expected[:12]]
    assert html.count('<td class="fold"') == 1  # the samples' small tables keep their first rows only


# a DataFrame's column names label the report's feature tables without feature_names
def test_report_dataframe_feature_names(tmp_path):
    import pandas as pd

    from actclust import ActivationClustering

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    df = pd.DataFrame(np.random.default_rng(0).standard_normal((80, 4)), columns=["age", "bmi", "bp", "glucose"])
    ac = ActivationClustering(net, ["0", "2"], n_clusters=3, progress=False).fit(df)
    html = report(ac, df, train=df, out=tmp_path / "r.html").read_text()
    assert 'title="glucose">glucose<' in html and 'title="x3"' not in html


# wrong training data, bad indices, bad counts and other shapes are clear errors
def test_report_errors(fitted, mixed_model, data, tmp_path):
    x, y = data
    with pytest.raises(DataError, match="train has 10 samples but the explainer was fitted on 120"):
        report(fitted, x, train=x[:10], out=tmp_path / "r.html")
    # the right length in another order: its pictures would have been other samples' (an outside check's shuffled
    # training set drew wrong similar samples and exemplars without a word); the model's predictions tell
    from actclust import ActivationClustering
    from conftest import LAYERS

    mixed = ActivationClustering(mixed_model, LAYERS, n_clusters=4, progress=False).fit(x, y)  # predicts 3 classes
    shuffled = x[np.random.default_rng(0).permutation(len(x))]
    mixed.set_display(train=x)  # the data fit saw: fine
    from actclust import DataWarning

    for draw in (lambda: report(mixed, x, train=shuffled, out=tmp_path / "shuffled.html"),
                 lambda: mixed.set_display(train=shuffled)):
        with pytest.warns(DataWarning, match=r"train may not be the training data fit saw, in its order: the model's "
                                             r"predictions on 64 of its rows agree with fit's on \d+%") as said:
            draw()
        assert said[0].filename == __file__
    with pytest.raises(ValueError, match=r"indices \[500\] are out of range for the 120 inputs"):
        report(fitted, x, indices=[1, 500], out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="n_wrong must be a non-negative int"):
        report(fitted, x, n_wrong=-1, out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="class_names must name the 3 classes"):
        report(fitted, x, class_names=["a"], out=tmp_path / "r.html")
    # many cards: the report still writes, and says the explorer browses many inputs better (2,000 cards made a
    # 33 MB page that took 13 s to open, without a word)
    from actclust import RenderWarning
    from actclust.views import report as report_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_module, "MANY_CARDS", 5)
        with pytest.warns(RenderWarning, match=r"The report will hold 6 explanations.*serve the explorer") as said:
            report(fitted, x, indices=list(range(6)), out=tmp_path / "many.html", trust=False)
    assert said[0].filename == __file__ and (tmp_path / "many.html").exists()
    with pytest.raises(DataError, match=r"per-sample shape \(1, 5, 5\) but the explainer was fitted on inputs of shape \(1, 6, 6\)"):
        report(fitted, np.zeros((4, 1, 5, 5), np.float32), out=tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


# an existing file is never replaced silently: refused before any work, replaced with overwrite=True
def test_report_does_not_overwrite(fitted, data, tmp_path):
    out = tmp_path / "r.html"
    out.write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        report(fitted, data[0], out=out)
    assert out.read_text() == "mine"
    assert "<!DOCTYPE html>" in report(fitted, data[0], out=out, overwrite=True).read_text()

    # a file made at --out while the report works (after the check before it): kept, not replaced by the report's
    # rename (the user's notes were lost: an outside check)
    from actclust.analysis import explanation

    late = tmp_path / "late.html"
    real = explanation.explain

    def meanwhile(*args, **kwargs):
        late.write_text("notes made meanwhile")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(explanation, "explain", meanwhile)
        with pytest.raises(RunExistsError, match=r"late.html appeared while the report was being written, and is left "
                                                 r"as it is; pass overwrite=True \(--overwrite\)"):
            report(fitted, data[0], out=late)
    assert late.read_text() == "notes made meanwhile"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".actclust-tmp")]


# a fit without labels: the report says once which trust signals are unavailable, and why
def test_report_says_which_trust_signals_are_missing(tmp_path):
    from actclust import ActivationClustering, TrustWarning

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = np.random.default_rng(0).standard_normal((600, 4)).astype(np.float32)
    ac = ActivationClustering(net, ["0", "2"], n_clusters=3, progress=False).fit(x)
    with pytest.warns(TrustWarning, match="needs true labels") as said:
        html = report(ac, x[:40], train=x, out=tmp_path / "r.html", n_correct=2, n_wrong=0).read_text()
    assert said[0].filename == __file__  # the user's line, not one of actclust's (views/report.py was named)
    assert html.count("Not shown or not calibrated: stacked_trust is unavailable") == 1  # once, not under each card
    assert "DNN confidence" in html and "dnn confidence" not in html  # its name, as a reader writes it
    # what each signal shown means, in a glossary and in each chip's tooltip (only the names were shown: an outside
    # check); stacked trust, not shown, is not explained
    from actclust.analysis.trust import MEANINGS

    glossary = re.search(r'<details class="meanings"><summary>What the trust signals mean</summary><dl>(.*?)</dl>', html).group(1)
    terms = re.findall(r"<dt>([A-Za-z -]+)</dt>", glossary)
    assert "kNN typicality" in terms and "credibility" in terms and "stacked trust" not in terms
    chip = re.search(r'<span class="chip(?: low)?" title="([^"]*)">OOD typicality', html).group(1)
    assert chip.startswith(MEANINGS["ood_typicality"])


# a report's trust notes are for its readers: the advice to the Python caller some notes end with ("in Python,
# calibration=ac.query(...)") is left to the warning, which the caller reads (an outside check of the demo's report);
# the advice for anyone ("fit with them") stays (an outside review)
def test_trust_notes_without_python_advice_in_the_report(tmp_path):
    from conftest import TinyCNN

    from actclust import ActivationClustering, TrustWarning

    x = np.random.default_rng(0).standard_normal((600, 1, 6, 6)).astype(np.float32)
    ac = ActivationClustering(TinyCNN(seed=3, bias=False).eval(), ["conv", "fc1"], n_clusters=4, progress=False).fit(x)
    with pytest.warns(TrustWarning, match=r"stacked_trust is unavailable: it learns the DNN's right from wrong "
                                          r"predictions and needs true labels \(fit with them; in Python, also "
                                          r"calibration=ac\.query\(X_val, y_val, vectors=True\)\)"):
        path = report(ac, x[:50], out=tmp_path / "r.html", n_correct=2, n_wrong=0)
    html = path.read_text()
    assert ("Not shown or not calibrated: stacked_trust is unavailable: it learns the DNN&#39;s right from wrong "
            "predictions and needs true labels (fit with them); credibility and dknn_prediction count") in html
    assert "in Python" not in html and "ac.query" not in html
