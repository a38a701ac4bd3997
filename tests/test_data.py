"""Data in every form a user brings: tables, dicts of inputs, tuple and dict batches, loaders."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import actclust
from actclust import ActivationClustering, CaptureError, DataError, ParameterError

from conftest import LAYERS, hook_count


class TwoInputs(nn.Module):
    """forward(a, b): two tensors, concatenated; layers 'fa' and 'out'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fa = nn.Linear(3, 4)
        self.out = nn.Linear(6, 3)

    def forward(self, a, b):
        return self.out(torch.cat([torch.relu(self.fa(a)), b], 1))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


# a DataFrame gives the same results as its values, and its column names are kept for reports
def test_dataframe_equals_its_array():
    x = np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32)
    df = pd.DataFrame(x, columns=["age", "bmi", "bp", "s1"])
    a = ActivationClustering(_mlp(), ["0", "2"], n_clusters=3, progress=False).fit(x)
    b = ActivationClustering(_mlp(), ["0", "2"], n_clusters=3, progress=False).fit(df, pd.Series(a.predict(x)))
    assert np.array_equal(b.predict(df), a.predict(x))
    assert b.state_.input_spec.feature_names == ("age", "bmi", "bp", "s1")
    df64 = df.astype("float64")  # a float64 table is taken as the model's float32
    assert np.array_equal(b.predict(df64), a.predict(x))
    assert np.array_equal(b.predict(x), a.predict(x))  # its array: read by position, as fitted
    # columns are read by position: another order or other names would give silently wrong answers, so they are
    # refused, saying what to pass
    with pytest.raises(DataError, match=r"X's columns are the training inputs' in another order, and the model reads "
                                        r"them by position: select them in the fitted order, X\[\['age', 'bmi', 'bp', 's1'\]\]"):
        b.predict(df[["bmi", "age", "bp", "s1"]])
    with pytest.raises(DataError, match=r"X's columns differ from the training inputs': missing \['bp'\]; not fitted "
                                        r"\['BP'\]. Pass the fitted columns, \['age', 'bmi', 'bp', 's1'\], in that order"):
        b.predict(df.rename(columns={"bp": "BP"}))
    with pytest.raises(DataError, match=r"one row of a table, df.iloc\[i\], is a Series, read as one column: pass "
                                        r"df.iloc\[\[i\]\]"):
        b.predict(df.iloc[0])
    assert np.array_equal(b.predict(df.iloc[[0]]), b.predict(df)[:1])
    # a label Series whose index holds the table's labels in another order: each label would go to another row (an
    # outside check: accuracy 1.0 -> 0.57); refused, saying how to align them. Another index is taken by position
    shuffled = df.sample(frac=1, random_state=0)
    labels = pd.Series(a.predict(shuffled.to_numpy()), index=shuffled.index)
    fit = ActivationClustering(_mlp(), ["0", "2"], n_clusters=3, progress=False)
    with pytest.raises(DataError, match=r"y's index holds the labels of X's index in another order, and labels go to rows "
                                        r"by position: each would go to another row\. Pass y\.loc\[X\.index\]"):
        fit.fit(shuffled, labels.sort_index())
    fit.fit(shuffled, labels)
    fit.fit(shuffled, labels.reset_index(drop=True))
    fit.fit(shuffled.reset_index(drop=True), labels)  # X's index 0..n-1: by position too (review)
    mixed = shuffled.set_axis([f"r{i}" if i % 2 else i for i in range(len(shuffled))])  # an index of ints and text
    fit.fit(mixed, pd.Series(labels.to_numpy(), index=range(5, 5 + len(labels))))  # no sort of it (a TypeError)
    # a table with its label column left in: the model's shape error, and which columns it met (an outside check)
    with pytest.raises(CaptureError, match=r"X is a table of 5 columns, the last 'bp', 's1', 'target': is a label or id "
                                           r"column left in\? Drop it before fit"):
        ActivationClustering(_mlp(), ["0", "2"], n_clusters=3, progress=False).fit(df.assign(target=1.0))
    # list_layers takes a table as fit does (the model was handed the DataFrame: a traceback)
    assert actclust.list_layers(_mlp(), df.iloc[:2])["0"] == (2, 8)
    with pytest.raises(DataError, match=r"y's index holds the labels of X's index in another order"):
        fit.score(shuffled, labels.sort_index())


# a DataFrame with text columns says which columns to encode
def test_dataframe_text_columns():
    df = pd.DataFrame({"age": [1.0, 2.0, 3.0], "city": ["a", "b", "c"], "bmi": [1.0, 2.0, 3.0], "x": [0.0] * 3})
    with pytest.raises(DataError, match=r"non-numeric columns \['city'\]: encode them as numbers"):
        ActivationClustering(_mlp(), ["0"], n_clusters=2, progress=False).fit(df)


# a dict of arrays is passed to the model by keyword; a tuple batch positionally, with label_key
def test_dict_and_tuple_inputs():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 3)).astype(np.float32), rng.standard_normal((50, 2)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    model = TwoInputs().eval()
    ac = ActivationClustering(model, ["fa", "out"], n_clusters=3, progress=False).fit({"a": a, "b": b}, y)
    with torch.no_grad():
        direct = model(torch.from_numpy(a), torch.from_numpy(b)).argmax(1).numpy()
    assert np.array_equal(ac.train_predictions_, direct)
    ds = TensorDataset(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(y))
    tup = ActivationClustering(model, ["fa", "out"], n_clusters=3, label_key=2, progress=False).fit(ds)
    assert np.array_equal(tup.train_predictions_, direct) and np.array_equal(tup.train_labels_, y)
    assert np.array_equal(tup.predict(ds), ac.predict({"a": a, "b": b}))
    # a tuple of arrays: the model's inputs in order, as a tuple batch of a dataset gives them
    pos = ActivationClustering(model, ["fa", "out"], n_clusters=3, progress=False).fit((a, b), y)
    assert np.array_equal(pos.train_predictions_, direct) and np.array_equal(pos.predict((a, b)), tup.predict(ds))
    assert len(pos.explain((a[:2], b[:2]), trust=False)) == 2
    for bad, match in (([a, b], "got a list: convert a list of samples with np.asarray first, or pass a model's "
                                "inputs as a tuple"),
                       ((a, "b"), "got a tuple that holds other values than arrays"), ((), "got an empty tuple"),
                       ((a, b[:10]), r"The arrays of X differ in length: \{'0': 50, '1': 10\}")):
        with pytest.raises(DataError, match=match):
            pos.predict(bad)
    # (x, y) given as X to a model of one input: said before the model runs, with where the labels go
    with pytest.raises(DataError, match=r"X gives the model 2 inputs \(a tuple is the model's inputs in order\), but "
                                        r"its forward takes 1 positionally: pass the inputs alone, and the labels as "
                                        r"y= \(inputs its forward takes by keyword: a dict of them by name\)"):
        ActivationClustering(_mlp(), ["0"], n_clusters=3, progress=False).fit((np.hstack([a, b[:, :1]]), y))
    # inputs by keyword in another order: matched by name; other names or a missing one are refused
    assert np.array_equal(ac.query({"b": b, "a": a}).dnn_pred, direct)
    with pytest.raises(DataError, match=r"gives the model a dict of 2 inputs \['a', 'c'\], but the explainer was"):
        ac.predict({"a": a, "c": b})
    with pytest.raises(DataError, match=r"X\['b'\] has per-sample shape \(3,\) but the explainer was fitted on "
                                        r"inputs of shape \(2,\)"):
        ac.predict({"b": a, "a": a})


# a tuple of three tensors is never guessed: the error says to set label_key
def test_three_tensors_need_label_key():
    rng = np.random.default_rng(0)
    ds = TensorDataset(torch.randn(20, 3), torch.randn(20, 2), torch.from_numpy(rng.integers(0, 3, 20)))
    with pytest.raises(DataError, match=r"tuples of 3 tensors .*label_key=<its position>, or label_key=None"):
        ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, progress=False).fit(ds)


# a loader of (ids, lengths) for forward(ids, lengths): label_key="auto" takes the lengths, one integer per sample, as
# labels; the model's error then says so and how to pass them all (it pointed at the inputs' shape: an outside check)
def test_guessed_labels_said_when_the_model_fails():
    class Lengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 4), nn.Linear(4, 2)

        def forward(self, ids, lengths):
            keep = (torch.arange(ids.shape[1])[None] < lengths[:, None]).float()
            return self.head((self.emb(ids) * keep[..., None]).sum(1) / lengths[:, None].float())

    rng = np.random.default_rng(0)
    ds = TensorDataset(torch.from_numpy(rng.integers(1, 20, (40, 6))), torch.from_numpy(rng.integers(1, 7, 40)))
    with pytest.raises(CaptureError, match=r"missing 1 required positional argument: 'lengths'.*Each batch of X is a "
                                           r"pair whose second element, one integer per sample, was taken as the labels "
                                           r"\(label_key='auto'\)\. If it is an input of the model, pass label_key=None"):
        ActivationClustering(Lengths(), ["head"], n_clusters=2, progress=False).fit(DataLoader(ds, batch_size=16))
    ac = ActivationClustering(Lengths(), ["head"], n_clusters=2, label_key=None, progress=False)
    assert ac.fit(DataLoader(ds, batch_size=16)).train_labels_ is None


# a second float tensor is not silently taken as labels
def test_second_float_tensor_is_not_a_label():
    ds = TensorDataset(torch.randn(20, 3), torch.randn(20, 2))
    with pytest.raises(DataError, match=r"tuples of 2 tensors \(float32 \(20, 3\), float32 \(20, 2\)\)"):
        ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, progress=False).fit(ds)
    ac = ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, label_key=None, progress=False).fit(ds)
    assert ac.train_labels_ is None


# dict batches: 'labels' is taken as the label (Hugging Face's name), or the key given
def test_dict_batches_label_key():
    class DictSet(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"a": torch.randn(3, generator=g), "b": torch.randn(2, generator=g), "target": i % 3}

    ac = ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, label_key="target", progress=False).fit(DictSet())
    assert ac.train_labels_.tolist() == [i % 3 for i in range(30)]
    with pytest.raises(DataError, match=r"label_key='y' is not a key of the batches of X; they have \['a', 'b', 'target'\]"):
        ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, label_key="y", progress=False).fit(DictSet())
    with pytest.raises(ParameterError, match="batches of X are dicts, so label_key must name a key"):
        ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, label_key=1, progress=False).fit(DictSet())


# a dict of arrays in memory takes its labels as a loader's dict batches do: "labels" with label_key="auto", or the key
# given (both were passed to the model, which refused the keyword); label_key=None passes every key to the model
def test_dict_of_arrays_label_key():
    g = torch.Generator().manual_seed(0)
    a, b, y = torch.randn(30, 3, generator=g), torch.randn(30, 2, generator=g), torch.arange(30) % 3
    auto = ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, progress=False).fit({"a": a, "b": b, "labels": y})
    assert auto.train_labels_.tolist() == y.tolist()
    named = ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, label_key="target", progress=False).fit(
        {"a": a, "b": b, "target": y}, y)  # and y= agreeing
    assert named.train_labels_.tolist() == y.tolist()
    np.testing.assert_array_equal(named.train_vectors_["fa"], auto.train_vectors_["fa"])
    with pytest.raises(DataError, match=r"labels in the batches of X differ from y= at row 0"):
        ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, progress=False).fit({"a": a, "b": b, "labels": y},
                                                                                    (y + 1) % 3)
    with pytest.raises(CaptureError, match=r"unexpected keyword argument 'labels'"):
        ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, label_key=None, progress=False).fit(
            {"a": a, "b": b, "labels": y})


# a Dataset of (inputs by name, label) pairs, PyTorch's and Hugging Face's usual items: inputs and labels (it was
# refused, "must hold tensors; found a dict", with label_key="auto" and label_key=1 alike)
@pytest.mark.parametrize("label_key", ["auto", 1])
def test_pairs_of_a_dict_and_a_label(label_key):
    g = torch.Generator().manual_seed(0)
    a, b, y = torch.randn(30, 3, generator=g), torch.randn(30, 2, generator=g), torch.arange(30) % 3

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return {"a": a[i], "b": b[i]}, y[i]

    ac = ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, label_key=label_key, progress=False).fit(
        DataLoader(Pairs(), batch_size=8))
    assert ac.train_labels_.tolist() == y.tolist()
    want = ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, progress=False).fit({"a": a, "b": b}).train_vectors_
    np.testing.assert_allclose(ac.train_vectors_["fa"], want["fa"], rtol=1e-6)
    with pytest.raises(DataError, match=r"must hold tensors; found a dict \(a pair of a dict of inputs and a 1-D array "
                                        r"of labels is read as inputs and labels\)"):
        ActivationClustering(TwoInputs(), ["fa"], n_clusters=2, label_key=label_key, progress=False).fit(
            DataLoader(Pairs(), batch_size=8, collate_fn=lambda items: ({"a": a[:8], "b": b[:8]}, {"c": y[:8]})))


# samplers other than sequential are refused: labels and indices would not match the samples
@pytest.mark.parametrize("make, match", [
    (lambda ds: DataLoader(ds, sampler=SubsetRandomSampler(range(10))), "draws its samples with a SubsetRandomSampler"),
    (lambda ds: DataLoader(ds, shuffle=True), "draws its samples with a RandomSampler"),
    (lambda ds: DataLoader(ds, batch_size=7, drop_last=True), "drop_last=True and would skip the last 1 samples"),
])
def test_non_sequential_loaders_refused(model, data, make, match):
    ds = TensorDataset(torch.from_numpy(data[0][:50]), torch.from_numpy(data[1][:50]))
    with pytest.raises(DataError, match=match):
        ActivationClustering(model, LAYERS, n_clusters=2, progress=False).fit(make(ds))


# uint8 images and flat vectors for a conv net are refused before the model runs, saying what to do
def test_wrong_dtype_and_shape_before_forward(model, data, fitted):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    u8 = (np.clip(data[0], 0, 1) * 255).astype(np.uint8)
    with pytest.raises(DataError, match=r"uint8 values \(raw image bytes\?\): convert to float and normalise"):
        ActivationClustering(model, LAYERS, n_clusters=2, progress=False).fit(u8)
    assert calls == []
    with pytest.raises(DataError, match=r"int64 values but the model has no embedding layer"):
        ActivationClustering(model, LAYERS, n_clusters=2, progress=False).fit(data[0].astype(np.int64))
    with pytest.raises(DataError, match=r"per-sample shape \(36,\) but the explainer was fitted on inputs of shape "
                                        r"\(1, 6, 6\): pass inputs of that shape \(e.g. x.reshape\(-1, 1, 6, 6\)\)"):
        fitted.predict(data[0].reshape(len(data[0]), -1))
    # another shape and another type: both said at once (the type alone was said; converting it met the shape next:
    # an outside check)
    with pytest.raises(DataError, match=r"X holds int32 values of per-sample shape \(36,\), but the explainer was "
                                        r"fitted on float32 inputs of shape \(1, 6, 6\): pass inputs of that shape and "
                                        "type"):
        fitted.predict(data[0].reshape(len(data[0]), -1).astype(np.int32))
    # channels last: a transpose, never a reshape (which would scramble the pixels); one sample: a batch of one
    with pytest.raises(DataError, match=r"per-sample shape \(6, 6, 1\) .* \(channels last\? x.transpose\(0, 3, 1, 2\)\)"):
        fitted.predict(data[0].transpose(0, 2, 3, 1))
    mlp = ActivationClustering(_mlp(), ["0", "2"], n_clusters=2, progress=False).fit(data[0].reshape(-1, 36)[:, :4])
    with pytest.raises(DataError, match=r"per-sample shape \(\) .* \(one sample\? pass it as a batch of one, x\[None\]\)"):
        mlp.predict(data[0].reshape(-1, 36)[0, :4])
    # one image without its batch axis: its channels read as the samples (no hint was given: an outside check)
    with pytest.raises(DataError, match=r"per-sample shape \(6, 6\) .* \(one sample\? pass it as a batch of one, x\[None\]\)"):
        fitted.predict(data[0][0])


# flat vectors given to a conv net at fit time: the model's error, with the batch and what to check
def test_model_error_is_wrapped(model, data):
    with pytest.raises(CaptureError, match=r"model raised RuntimeError on rows 0-119 of X \(shape \(120, 36\), "
                                           r"float32\).*shape, dtype and scaling") as info:
        ActivationClustering(model, LAYERS, n_clusters=2, progress=False).fit(data[0].reshape(120, -1))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert hook_count(model) == 0


# a NaN in the inputs names its row, across batches
def test_nan_names_the_row(model, data):
    x = data[0].copy()
    x[77, 0, 2, 3] = np.nan
    with pytest.raises(DataError, match=r"X has NaN or infinite values at row 77; remove or impute them"):
        ActivationClustering(model, LAYERS, n_clusters=2, batch_size=32, progress=False).fit(x)
    x[80:82] = np.inf  # more in the batch: how many, and where ("in rows rows" before)
    with pytest.raises(DataError, match=r"X has NaN or infinite values at row 77 \(and 2 more in rows 64-95\); "):
        ActivationClustering(model, LAYERS, n_clusters=2, batch_size=32, progress=False).fit(x)


# score refuses labels the model does not have
def test_score_labels_out_of_range(fitted, data):
    with pytest.raises(DataError, match=r"y has classes the model does not have: \[3, 7\]"):
        fitted.score(data[0][:4], [0, 3, 7, 1])


# a fit that fails on new data leaves the previous fit whole
def test_failed_fit_changes_nothing(fitted, data):
    before = fitted.predict_proba(data[0])
    state = fitted.state_
    with pytest.raises(DataError):
        fitted.fit(np.zeros((10, 1, 5, 5), dtype=np.float32), np.full(10, 9))  # labels the model lacks
    with pytest.raises(CaptureError):
        fitted.fit(data[0].reshape(120, -1))
    assert fitted.state_ is state
    assert np.array_equal(fitted.predict_proba(data[0]), before)
    assert fitted.input_shape_ == (1, 6, 6)


# an IterableDataset (no length) is read in its own order, batch by batch
def test_iterable_dataset(model, data):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from (torch.from_numpy(x) for x in data[0][:50])

    ac = ActivationClustering(model, LAYERS, n_clusters=3, batch_size=16, progress=False).fit(Stream())
    assert ac.n_samples_fit_ == 50
    assert np.array_equal(ac.predict(Stream()), ac.predict(data[0][:50]))


# labels in the batches and y= together must agree; the first row that differs is named (they once
# disagreed silently, y= winning: accuracy with label posteriors fell from 0.92 to 0.12)
def test_batch_labels_and_y_must_agree(model, data):
    x, y = data
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    other = y.copy()
    other[37] = (y[37] + 1) % 3
    with pytest.raises(DataError, match=r"labels in the batches of X differ from y= at row 37 \(the batch says "
                                        rf"{y[37]}, y says {other[37]}\); give the labels one way only"):
        ActivationClustering(model, LAYERS, n_clusters=2, progress=False).fit(ds, other)
    agree = ActivationClustering(model, LAYERS, n_clusters=2, progress=False).fit(ds, y)
    assert np.array_equal(agree.train_labels_, y)


# text labels are refused with what to do, in fit and in score (they once gave a raw torch TypeError)
def test_text_labels(model, data, fitted):
    x, y = data
    names = np.array(["cat", "dog", "bird"])[y]
    with pytest.raises(DataError, match=r"y holds text labels \('\w+', '\w+', '\w+', ...\); the model's classes are "
                                        r"indices 0..n_classes-1: map each label"):
        fitted.score(x, names)
    with pytest.raises(DataError, match=r"y holds text labels"):
        ActivationClustering(model, LAYERS, n_clusters=2, progress=False).fit(x, list(names))


# read-only arrays and pandas Series go through without any warning from the frameworks underneath
def test_read_only_inputs_warn_nothing(data):
    import warnings

    x = data[0][:, 0, 0, :4].copy()
    x.setflags(write=False)
    y = pd.Series(data[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ac = ActivationClustering(_mlp(), ["0", "2"], n_clusters=3, progress=False).fit(x, y)
        ac.score(x, y)
        ac.score(pd.DataFrame(x), y)


# data prepared unlike the training data (scaled to [0, 1] instead of standardised) gets one warning naming
# the statistic; the training data itself, another split of it and a handful of inputs get none
def test_inputs_unlike_the_training_data_warn(model):
    import warnings

    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, (600, 1, 6, 6)).astype(np.float32) ** 2  # "pixels" in [0, 1]
    mean, std = raw[:400].mean(), raw[:400].std()
    train, test = (raw[:400] - mean) / std, (raw[400:] - mean) / std
    ac = ActivationClustering(model, LAYERS, n_clusters=3, progress=False).fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ac.score(test)
        ac.score(train)
        ac.predict(test[:5])
    with pytest.warns(actclust.DataWarning, match=r"X has mean 0.33. and standard deviation 0.29., where the training "
                                                  r"inputs had \S+ and 1. Were these inputs prepared as the training"):
        ac.score(raw[400:])
    with pytest.warns(actclust.DataWarning, match=r"of the values of X lie outside the training inputs' range"):
        ac.score(-test)  # mean and spread as in training, but mirrored: skewed the other way


# each value is judged against its own feature's range, and the warning says so: it quoted the range over every feature,
# which held the values it said lay outside (an outside check)
def test_outside_range_said_per_feature():
    rng = np.random.default_rng(0)
    skew = 0.4 + 0.3 * rng.beta(1, 5, 600)
    train = np.column_stack([skew, rng.uniform(0, 1, 600)]).astype(np.float32)  # every value within [0, 1]
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    ac = ActivationClustering(model, ["1"], n_clusters=3, progress=False).fit(train[:400])
    mirrored = train[400:].copy()
    mirrored[:, 0] = 2 * skew[:400].mean() - mirrored[:, 0]  # within [0, 1], below feature 0's least value
    with pytest.warns(actclust.DataWarning, match=r"of the values of X lie outside the training inputs' range of their "
                                                  r"own feature \(every feature's range lies within \[0.00529, 0.997\]\)"):
        ac.score(mirrored)


# a few rows leave a few values past their features' ranges by chance: 3 of 8 rows x 64 values warned (one
# in-distribution batch in 40: an outside check); a small batch needs ten times the share, a real departure still warns
def test_outside_range_allows_chance_in_small_batches():
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 1, (400, 64)).astype(np.float32)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    ac = ActivationClustering(model, ["1"], n_clusters=3, progress=False).fit(train)
    few = rng.uniform(0, 1, (8, 64)).astype(np.float32)
    few.flat[[5, 100, 300]] = 1.2  # 0.6% of the values, past the range widened by 5%
    with warnings.catch_warnings():
        warnings.simplefilter("error", actclust.DataWarning)
        ac.predict(few)
    few.flat[rng.choice(few.size, 40, replace=False)] = 1.2  # 8%
    with pytest.warns(actclust.DataWarning, match=r"of the values of X lie outside the training inputs' range"):
        ac.predict(few)


# features that are mostly one value (the digits' border pixels: some constant in training, some nonzero in 1% of
# the images) move by chance in a few hundred inputs: a held-out split and training rows themselves get no warning,
# while a spread halved on every feature still gets one
def test_sparse_features_do_not_warn():
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    assert ((x_tr > 0).mean(0) == 0).any() and (((x_tr > 0).mean(0) > 0) & ((x_tr > 0).mean(0) < 0.02)).any()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    ac = ActivationClustering(net, ["1", "2"], n_clusters=5, progress=False).fit(x_tr, y_tr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ac.score(x_te, y_te)
        ac.score(x_tr[:300], y_tr[:300])
        for i in range(40):  # a few inputs: a rare pixel moves their means far, by chance
            ac.predict(x_tr[i:i + 1])
            ac.predict(x_te[2 * i:2 * i + 2])
            ac.predict(x_te[8 * i:8 * i + 8])
    for scaled in (x_te[:1] * 16, (x_te[:5] - x_tr.mean(0)) / (x_tr.std(0) + 1e-6), x_te[:5] + 0.1):
        with pytest.warns(actclust.DataWarning, match="Were these inputs prepared as the training inputs were"):
            ac.predict(scaled)
    squeezed = (x_te - x_tr.mean(0)) * 0.4 + x_tr.mean(0)
    with pytest.warns(actclust.DataWarning, match=r"X feature \d+ has mean \S+ and standard deviation \S+, where the "
                                                  r"training inputs had"):
        ac.score(squeezed, y_te)


# token ids beyond the model's embedding: the error names the input and the ids' range (it said only "index out of range
# in self" and pointed at the inputs' scaling: an outside check)
def test_ids_beyond_the_embedding():
    class Ids(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask=None):
            return self.out(self.emb(input_ids).mean(1))

    ids = np.random.default_rng(0).integers(0, 10, (30, 5))
    ids[3, 2] = 500
    with pytest.raises(CaptureError, match=r"IndexError.*input_ids holds token ids from 0 to 500: an id below 0 or at "
                                           r"least as large as the model's embedding \(its vocabulary size\) has no row"):
        ActivationClustering(Ids(), ["out"], n_clusters=2, progress=False).fit({"input_ids": ids})


# an input whose attention mask keeps no token: its token maps average nothing and its vector is zero, said once
# (it was clustered and explained as such without a word: an outside check)
def test_empty_attention_mask_warned():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            return self.out(self.emb(input_ids).mean(1))

    rng = np.random.default_rng(0)
    ids, mask = rng.integers(1, 10, (40, 5)), np.ones((40, 5), np.int64)
    mask[7] = 0
    with pytest.warns(actclust.DataWarning, match=r"rows 0-39 of X: 1 input\(s\) have an attention mask that keeps no "
                                                  r"token \(the first is input 7 of the batch\): their token maps average "
                                                  r"nothing, so their vectors are zero"):
        ac = ActivationClustering(Tok(), ["emb", "out"], n_clusters=2, progress=False, normalize=None).fit(
            {"input_ids": ids, "attention_mask": mask})
    assert not ac.train_vectors_["emb"][7].any() and ac.train_vectors_["emb"][6].any()


# a loader whose collate_fn makes the model's inputs from raw items (a tokenizer's): the training samples drawn for the
# notebook and the report come through that collate_fn too (the raw items were taken as inputs: "must hold tensors;
# found a list", an outside check)
def test_rows_of_a_loader_go_through_its_collate_fn():
    from actclust.capture.data import rows

    items = [{"text": i, "label": i % 3} for i in range(20)]

    def collate(batch):
        return {"x": torch.tensor([[float(b["text"]), 1.0] for b in batch]),
                "labels": torch.tensor([b["label"] for b in batch])}

    got = rows(DataLoader(items, batch_size=8, collate_fn=collate), np.array([3, 11]))
    assert [r["x"].tolist() for r in got] == [[3.0, 1.0], [11.0, 1.0]]
