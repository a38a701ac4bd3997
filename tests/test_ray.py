"""The Ray engine (engine="ray") on a local Ray cluster: same results as the local engine, order, faults."""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LAYERS, TinyCNN, require_ray
from torch import nn

import actclust
from actclust import ActivationClustering, CaptureError, DataError, ParameterError

MARK = 123.0  # an input value that makes Marked act (sleep, die or raise)


class Marked(TinyCNN):
    """TinyCNN that, on a batch holding the value MARK, sleeps, kills its process (once: a marker file
    says it happened) or raises; ``action=None`` is the plain network, for the local reference."""

    def __init__(self, action=None, path=None):
        super().__init__(seed=3, bias=False)
        self.action, self.path = action, path

    def forward(self, x):
        if self.action is not None and bool((x == MARK).any()):
            if self.action == "sleep":
                time.sleep(2.0)
            elif self.action == "exit" and not os.path.exists(self.path):
                Path(self.path).write_text(str(os.getpid()))
                os._exit(1)  # the worker dies mid-fit, as when a node is lost
            elif self.action == "raise":
                raise ValueError("boom at the marked sample")
        return super().forward(x)


class TableNet(nn.Sequential):
    """An MLP with BatchNorm (eval: running statistics) on 5 table columns; fixed weights."""

    def __init__(self):
        torch.manual_seed(1)
        super().__init__(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        with torch.no_grad():
            self[1].running_mean.uniform_(-0.5, 0.5)
            self[1].running_var.uniform_(0.5, 2.0)
        self.eval()


class DictNet(nn.Module):
    """Inputs by keyword: ``a`` (N, 4) and ``b`` (N, 2, 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fa, self.fb, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(12, 3)

    def forward(self, a, b):
        return self.out(torch.cat([torch.relu(self.fa(a)), torch.relu(self.fb(b.flatten(1)))], 1))


@pytest.fixture(scope="module")
def ray_cluster():
    ray = require_ray()
    # The workers import this module and conftest (the models) from the tests folder.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.standard_normal((600, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, 600)


def _fit(model, x, y=None, layers=LAYERS, **options):
    return ActivationClustering(model, layers, n_clusters=4, batch_size=64, progress=False, **options).fit(x, y)


def assert_same_fit(local, ray_fit):
    """Bit for bit: the same vectors, predictions, centres, class mixes and training scores."""
    s, r = local.state_, ray_fit.state_
    assert sorted(s.train_vectors) == sorted(r.train_vectors)
    for k in s.train_vectors:
        np.testing.assert_array_equal(np.asarray(s.train_vectors[k]), np.asarray(r.train_vectors[k]))
    np.testing.assert_array_equal(s.train_predictions, r.train_predictions)
    for l in s.layers:
        np.testing.assert_array_equal(s.clusterings[l].centers_, r.clusterings[l].centers_)
        np.testing.assert_array_equal(s.posteriors[l], r.posteriors[l])
    assert s.train_score == r.train_score
    assert s.input_spec == r.input_spec


# engine="ray" on arrays gives exactly the local fit, also when batches reach the driver out of
# order (the first batch sleeps 2 s: later ones arrive before it) and land at their samples' rows
def test_ray_fit_identical_to_local_in_any_order(ray_cluster, images):
    x, y = images
    x = x.copy()
    x[0, 0, 0, 0] = MARK
    local = _fit(Marked(), x, y)
    on_ray = _fit(Marked("sleep"), x, y, engine="ray")
    assert_same_fit(local, on_ray)
    np.testing.assert_array_equal(local.cluster_paths(x), on_ray.cluster_paths(x))
    info = on_ray.fit_info_["engine"]
    assert info["name"] == "ray" and info["actors"] == 2 and info["batches"] == 10  # 600 rows in blocks of 64
    assert info["out_of_order"] >= 1


# a ray.data.Dataset from NumPy: the same fit; score, predict and query take the dataset
def test_ray_dataset_from_numpy(ray_cluster, images):
    x, y = images
    local = _fit(Marked(), x, y)
    ds = ray_cluster.data.from_numpy(x)
    on_ray = _fit(Marked(), ds, y, engine="ray")
    assert_same_fit(local, on_ray)
    assert on_ray.score(ds, y) == local.score(x, y)
    q, ql = local.query(ds, vectors=True), on_ray.query(x, vectors=True)  # a local fit queries a dataset too
    np.testing.assert_array_equal(q.dnn_proba, ql.dnn_proba)
    for k in ql.vectors:
        np.testing.assert_array_equal(q.vectors[k], ql.vectors[k])
        np.testing.assert_array_equal(q.distances.get(k), ql.distances.get(k))
    np.testing.assert_array_equal(on_ray.similar(x[:5]).indices, local.similar(x[:5]).indices)


# a table in Parquet, read by Ray (label column "label"), fits as the same DataFrame locally;
# the BatchNorm model runs in eval mode on the actors too
def test_ray_parquet_table_with_batchnorm(ray_cluster, tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    df = pd.DataFrame(rng.standard_normal((500, 5)).astype(np.float32), columns=list("abcde"))
    y = rng.integers(0, 3, 500)
    df.assign(label=y).iloc[:250].to_parquet(tmp_path / "part-0.parquet")
    df.assign(label=y).iloc[250:].to_parquet(tmp_path / "part-1.parquet")
    layers = ["0", "1", "3"]
    local = _fit(TableNet(), df, y, layers=layers)
    on_ray = _fit(TableNet(), ray_cluster.data.read_parquet(str(tmp_path)), layers=layers, engine="ray")
    assert_same_fit(local, on_ray)  # labels from the column, feature names from the column names
    assert on_ray.state_.input_spec.feature_names == tuple("abcde")


# dict inputs: tensor columns go to the model by keyword
def test_ray_dict_columns(ray_cluster):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((300, 4)).astype(np.float32), rng.standard_normal((300, 2, 3)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    local = _fit(DictNet(), {"a": a, "b": b}, y, layers=["fa", "fb", "out"])
    ds = ray_cluster.data.from_items([{"a": a[i], "b": b[i], "y": y[i]} for i in range(300)])
    on_ray = _fit(DictNet(), ds, layers=["fa", "fb", "out"], engine="ray")
    assert_same_fit(local, on_ray)


# a torch Dataset read by Ray (one column of (input, label) items) fits as the Dataset does locally
def test_ray_from_torch(ray_cluster, images):
    x, y = images
    tds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    assert_same_fit(_fit(Marked(), tds), _fit(Marked(), ray_cluster.data.from_torch(tds), engine="ray"))


# a worker killed mid-fit is restarted by Ray, its batch run again: the identical result
def test_ray_worker_killed_mid_fit(ray_cluster, images, tmp_path):
    x, y = images
    x = x.copy()
    x[300, 0, 0, 0] = MARK
    died = tmp_path / "died"
    local = _fit(Marked(), x, y)
    on_ray = _fit(Marked("exit", str(died)), x, y, engine="ray")
    assert died.exists() and int(died.read_text()) != os.getpid()  # a worker did die
    assert_same_fit(local, on_ray)


# an error of the model on a worker names the batch's rows and the worker's error
def test_ray_model_error_names_batch(ray_cluster, images):
    x, y = images
    x = x.copy()
    x[70, 0, 0, 0] = MARK
    with pytest.raises(CaptureError, match=r"ValueError on rows 64-127 of X .*boom at the marked sample.*Ray worker"):
        _fit(Marked("raise"), x, y, engine="ray")


# a run fitted on Ray with a disk store saves, and loads and predicts locally; runs saved before
# engine existed (no engine/ray_options in the manifest) still load
def test_ray_run_saves_and_loads_locally(ray_cluster, images, tmp_path):
    x, y = images
    on_ray = _fit(Marked(), x, y, engine="ray", store=tmp_path / "vectors")
    on_ray.save(tmp_path / "run")
    loaded = actclust.load(tmp_path / "run", Marked(), progress=False)
    assert loaded.engine == "ray" and loaded.state_.train_vectors.on_disk
    np.testing.assert_array_equal(loaded.predict_proba(x), on_ray.predict_proba(x))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    del manifest["params"]["engine"], manifest["params"]["ray_options"]
    body = {k: v for k, v in manifest.items() if k != "digest"}
    manifest["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    old = actclust.load(tmp_path / "run", Marked(), progress=False)
    assert old.engine == "local"
    np.testing.assert_array_equal(old.predict(x), on_ray.predict(x))


# columns that cannot be told apart, an unknown label column, a reducer that needs an ordered pass
def test_ray_data_errors(ray_cluster, images):
    x, y = images
    ds = ray_cluster.data.from_items([{"img": x[i], "name": f"s{i}", "y": int(y[i])} for i in range(64)])
    with pytest.raises(DataError, match=r"has columns \['img', 'name', 'y'\].*cannot tell.*name: text"):
        _fit(Marked(), ds, engine="ray")
    with pytest.raises(DataError, match=r"label_key='target' is not a column"):
        _fit(Marked(), ds, engine="ray", label_key="target")
    only_img = _fit(Marked(), ds, engine="ray", ray_options={"columns": "img"})  # named: fits
    assert only_img.state_.train_labels is not None  # the "y" column
    with pytest.raises(ParameterError, match=r"need a fitting pass over the data in order"):
        _fit(Marked(), x, engine="ray", reducer={"conv": "pca:2", "fc1": "mean", "fc2": "mean"})
    with pytest.raises(DataError, match=r"X is a ray.data.Dataset: fit it with engine='ray'"):
        _fit(Marked(), ray_cluster.data.from_numpy(x))
    with pytest.raises(DataError, match=r"ray_options\['columns'\] names \['image'\], which are not columns"):
        _fit(Marked(), ds, engine="ray", ray_options={"columns": ["image"]})
    with pytest.raises(ParameterError, match=r"so label_key must name a column, or be 'auto' or None. Got 1"):
        _fit(Marked(), ds, engine="ray", label_key=1)
    with pytest.raises(DataError, match=r"y has 3 labels but X has 64 rows"):
        _fit(Marked(), ds, y[:3], engine="ray", ray_options={"columns": "img"})
    # labels as a column and as y= must agree (y= silently won over the column)
    wrong = (y[:64] + 1) % 2
    with pytest.raises(DataError, match=r"labels in the batches of X differ from y= at row 0 \(the batch says"):
        _fit(Marked(), ds, wrong, engine="ray", ray_options={"columns": "img"})
    with pytest.raises(DataError, match=r"labels in the batches of X differ from y= at row 0"):
        only_img.query(ds, wrong)
    agreed = _fit(Marked(), ds, y[:64], engine="ray", ray_options={"columns": "img"})
    np.testing.assert_array_equal(agreed.state_.train_labels, y[:64])
    # a plan that reorders the rows: labels given apart would belong to other rows (they were taken without a word)
    plain = ray_cluster.data.from_numpy(x[:64])
    with pytest.raises(DataError, match=r"plan reorders its rows \(random_shuffle\), so the labels given apart as y="):
        _fit(Marked(), plain.random_shuffle(seed=0), y[:64], engine="ray")
    with pytest.raises(DataError, match=r"reorders its rows \(randomize_block_order\).*Keep the labels in a column"):
        agreed.query(plain.randomize_block_order(seed=0), y[:64])
    shuffled = ray_cluster.data.from_items([{"img": x[i], "y": int(y[i])} for i in range(64)]).random_shuffle(seed=0)
    in_column = _fit(Marked(), shuffled, engine="ray")  # labels in a column travel with their rows
    assert in_column.state_.train_labels is not None

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.from_numpy(x[:10]))
    with pytest.raises(DataError, match=r"engine='ray' needs data whose length is known"):
        _fit(Marked(), Stream(), engine="ray")


# parameters are checked before any work, whether or not Ray is installed
def test_engine_parameters():
    with pytest.raises(ParameterError, match=r"'engine' parameter .* must be one of \['local', 'ray'\]. Got 'spark'"):
        _fit(TinyCNN(), np.zeros((8, 1, 6, 6), np.float32), engine="spark")
    with pytest.raises(ParameterError, match=r"'ray_options' parameter .* keys from .*Got \['workers'\]"):
        _fit(TinyCNN(), np.zeros((8, 1, 6, 6), np.float32), engine="ray", ray_options={"workers": 2})
    with pytest.raises(ParameterError, match=r"ray_options\['concurrency'\] must be None or an int >= 1. Got 0"):
        _fit(TinyCNN(), np.zeros((8, 1, 6, 6), np.float32), engine="ray", ray_options={"concurrency": 0})
    # 0 CPUs per actor sized the pool at two billion actors and fit never ended (an outside check)
    with pytest.raises(ParameterError, match=r"ray_options\['num_cpus'\] must be a number > 0. Got 0"):
        _fit(TinyCNN(), np.zeros((8, 1, 6, 6), np.float32), engine="ray", ray_options={"num_cpus": 0})


# an actor no node of the cluster can hold is refused: the fit waited for it without a word (an outside check)
def test_ray_actor_larger_than_the_cluster(ray_cluster, images):
    with pytest.raises(ParameterError, match=r"ray_options asks 100 CPU\(s\) and 0 GPU\(s\) per actor, but the Ray "
                                             r"cluster has 2 CPU\(s\) and 0 GPU\(s\) in all"):
        _fit(TinyCNN(), images[0][:64], engine="ray", ray_options={"num_cpus": 100})


# without Ray installed, engine="ray" says how to install it; the local engine does not need it
def test_missing_ray_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    x = np.random.default_rng(0).standard_normal((40, 1, 6, 6)).astype(np.float32)
    with pytest.raises(ParameterError, match=r'engine=.ray. needs Ray Data.*pip install "actclust\[ray\]"'):
        _fit(TinyCNN(), x, engine="ray")
    assert _fit(TinyCNN(), x).n_samples_fit_ == 40


# vectors added by sample position, in any order, land at their rows, in memory and on disk; a row
# given twice, a row missing, a position out of range or an unknown length is an error
@pytest.mark.parametrize("on_disk", [False, True])
def test_store_writer_by_position(tmp_path, on_disk):
    from actclust.store import StoreWriter

    v = np.arange(20, dtype=np.float32).reshape(10, 2)
    directory = tmp_path / "store" if on_disk else None
    with StoreWriter(directory, "float32", 10) as w:
        for rows in ([6, 7, 8, 9], [0, 1, 3], [2, 4, 5]):  # the last batch is not consecutive
            w.add({"a": v[rows]}, rows=np.array(rows))
        store = w.finish()
        np.testing.assert_array_equal(np.asarray(store["a"]), v)
        w.commit()
    assert store.on_disk == on_disk
    with StoreWriter(directory, "float32", 10) as w:
        w.add({"a": v[:4]}, rows=np.arange(4))
        with pytest.raises(DataError, match=r"Sample row 2 was given twice"):
            w.add({"a": v[2:3]}, rows=np.array([2]))
        with pytest.raises(DataError, match=r"sample positions outside 0..9"):
            w.add({"a": v[:1]}, rows=np.array([10]))
        with pytest.raises(DataError, match=r"gave 2 sample positions for 1 vectors"):
            w.add({"a": v[:1]}, rows=np.array([5, 6]))
        with pytest.raises(DataError, match=r"6 of 10 samples never arrived \(first: row 4\)"):
            w.finish()
    with pytest.raises(DataError, match=r"need the number of samples"):
        StoreWriter(None, "float32", None).add({"a": v}, rows=np.arange(10))
